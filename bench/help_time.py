"""Time `python -m ltexp --help` and a refused flag (`train --method nope`) in several checkouts,
interleaved in one run: `python bench/help_time.py PYTHON TREE [TREE...]` (each TREE on PYTHONPATH)."""
import os, subprocess, sys, time, statistics
py = sys.argv[1]; trees = sys.argv[2:]
res = {t: {"help": [], "bad": []} for t in trees}
for i in range(7):
    for t in trees:
        for kind, args in (("help", ["--help"]), ("bad", ["train", "--method", "nope"])):
            env = dict(os.environ, PYTHONPATH=t)
            t0 = time.perf_counter()
            subprocess.run([py, "-m", "ltexp", *args], cwd=t, env=env, capture_output=True)
            res[t][kind].append(time.perf_counter() - t0)
for t in trees:
    print(t, {k: f"median {statistics.median(v):.2f} s (min {min(v):.2f}, n={len(v)})" for k, v in res[t].items()})
