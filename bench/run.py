"""Placeholder until the benchmark suite lands (issue: benchmarks). Writes a results file saying so."""
import argparse
import json
import os
import time

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="bench/results")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, time.strftime("%Y-%m-%d") + ".json")
    with open(path, "w") as f:
        json.dump({"status": "placeholder: no benchmarks yet"}, f)
    print(f"wrote {path}")
