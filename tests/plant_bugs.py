"""Plant one bug at a time in src/, run the tests that should catch it, restore the file; print a table.

Run from anywhere: python tests/plant_bugs.py (about 4 minutes). Each row must say CAUGHT."""
import subprocess, sys, pathlib
ROOT = pathlib.Path(__file__).resolve().parents[1]
M = [
 ("Lloyd assigns by argmin", "src/kmeansinit/init/lloyd.py", "idx = r.argmax(dim=2, keepdim=True)", "idx = r.argmin(dim=2, keepdim=True)", "tests/test_kmeans_reference.py"),
 ("pairs: partner sums added, not subtracted", "src/kmeansinit/init/lloyd.py", "sums, counts = sums - sums[partner], counts + counts[partner]", "sums, counts = sums + sums[partner], counts + counts[partner]", "tests/test_kmeans_reference.py"),
 ("grouped banks share one count offset", "src/kmeansinit/init/lloyd.py", "bank_offset = (torch.arange(t.banks, device=c.device) * t.per_bank)", "bank_offset = (torch.arange(t.banks, device=c.device) * 0)", "tests/test_kmeans_reference.py"),
 ("ZCA on the bottom eigenvectors", "src/kmeansinit/init/whiten.py", "evals, evecs = torch.linalg.eigh(cov)", "evals, evecs = torch.linalg.eigh(cov); evecs = evecs.flip(1)", "tests/test_init.py::test_zca_space_maps_back_exactly tests/test_init.py::test_zca_statistics_from_a_patch_sample tests/test_kmeans_reference.py"),
 ("ZCA eps not relative to the mean eigenvalue", "src/kmeansinit/init/whiten.py", "eps = eps_zca * float(evals.clamp_min(0).mean())", "eps = eps_zca", "tests/test_init.py::test_zca_space_maps_back_exactly tests/test_init.py::test_zca_eps_reaches_the_whitening tests/test_kmeans_reference.py"),
 ("Loewdin returns its input", "src/kmeansinit/init/lloyd.py", "    ortho = (u @ vh).to(w.dtype)", "    ortho = conv[:, :keep].to(w.dtype)", "tests/test_init.py::test_orthogonal_option_gives_orthonormal_banks_closest_to_centroids"),
 ("kmeans preset drops its pairs", "src/kmeansinit/init/__init__.py", '"kmeans": dict(mode="layerwise", solver="lloyd", preprocess="zca", pairs=True, scale="xavier")', '"kmeans": dict(mode="layerwise", solver="lloyd", preprocess="zca", pairs=False, scale="xavier")', "tests/test_init.py::test_presets_apply_their_options"),
 ("init cache never hit", "src/kmeansinit/train.py", "        if path.exists():\n            blob = load_state", "        if False:\n            blob = load_state", "tests/test_train.py::test_init_cache_hit_does_not_run_the_init"),
 ("flips never applied", "src/kmeansinit/data.py", "x.flip(-1), x)", "x, x)", "tests/test_data.py::test_flip_batch_is_mirror_image tests/test_data.py::test_flips_and_crops_move_pixels_of_real_images"),
 ("online pass never moves its centroids", "src/kmeansinit/init/lloyd.py", "moving = torch.where(_expand(run.flatten(1).norm(dim=1) > _EPS, moving), unit_filters(run), moving)", "moving = moving", "tests/test_kmeans_reference.py -k online"),
 ("report sd is the population sd", "src/kmeansinit/report.py", "(statistics.stdev(xs) if len(xs) > 1 else 0.0)", "(statistics.pstdev(xs) if len(xs) > 1 else 0.0)", "tests/test_experiments.py -k report"),
]
rows = []
for name, f, old, new, tests in M:
    p = ROOT / f; src = p.read_text()
    if src.count(old) != 1:
        rows.append((name, f"NOT PLANTED ({src.count(old)} matches)")); continue
    p.write_text(src.replace(old, new))
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests.split()],
                           cwd=ROOT, capture_output=True, text=True, timeout=900)
        last = (r.stdout.strip().splitlines() or ["?"])[-1]
        rows.append((name, ("CAUGHT: " if r.returncode == 1 else f"rc={r.returncode}: ") + last))
    finally:
        p.write_text(src)
    print(rows[-1], flush=True)
print("\n| planted bug | result |\n|---|---|")
for n, res in rows:
    print(f"| {n} | {res} |")
