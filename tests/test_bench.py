"""The benchmark code runs (tiny sizes): `make bench` and the GPU MFU script must not rot on CPU-only CI."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_bench_quick(tmp_path):
    r = subprocess.run([sys.executable, "bench/run.py", "--quick", "--out", str(tmp_path),
                        "--cache", str(tmp_path / "cache")], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    (res_file,) = [f for f in os.listdir(tmp_path) if f.endswith("-quick.json")]
    res = json.load(open(tmp_path / res_file))["results"]
    assert {"train_step", "token_drop", "compiled", "loss", "optimizer", "data", "eval", "score", "mim",
            "distill"} <= set(res)
    assert all(res["distill"][k]["median"] > 0 for k in ("clip", "online", "offline"))
    compiled = res["compiled"]["drop_0.5"]  # Inductor's kernels (the one Inductor build in make test) = eager
    assert compiled["speedup"] > 0 and 0 < compiled["matmul_share"] < 1 and compiled["max_diff"] <= 1e-4, compiled
    assert res["score"]["pairs"] > 0 and res["score"]["ratio"] > 0
    assert res["mim"]["with_teacher"]["median"] > 0 and res["mim"]["without_teacher"]["median"] > 0
    for row in res["train_step"]:
        assert "speed_ratio" in row and "lamb_over_adamw" in row, row
        for impl in ("evaclip", "open_clip"):  # the profile's timers caught every part in both frameworks' loops
            prof = row[impl]["profile"]
            assert all(n > 0 for n in prof["hits"].values()) and prof["mean_s"]["step"] > 0, (impl, prof)
    assert all("error" not in r for r in res["loss"]["rows"]) and all("error" not in r for r in res["data"])
    assert {r["impl"] for r in res["loss"]["rows"] if "time" in r} == {"naive", "local", "tiled", "ring"}
    assert "error" not in res["loss"]["real_ring"] and len(res["loss"]["real_ring"]["real"]["ranks"]) == 4
    assert res["token_drop"]["speedup"] > 1.0
    md = open(tmp_path / res_file.replace(".json", ".md")).read()
    assert "open_clip_train" in md and "clip_benchmark" in md and "Real ring check" in md and "Curation" in md and "MIM step" in md
    assert "Compiled vs eager" in md and "Distillation: step time" in md and "Where a step's time goes" in md


def test_gpu_mfu_script_on_cpu(tmp_path):
    out = tmp_path / "mfu.json"
    r = subprocess.run([sys.executable, "bench/gpu_mfu.py", "--model", "EVA02-Ti-8-64", "--device", "cpu",
                        "--steps", "2", "--batch", "4", "--compile", "off", "towers", "--backend", "eager",
                        "--dtype", "fp32", "--peak-tflops", "1", "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.load(open(out))["rows"]
    assert [(row["compile"], row["patch_dropout"]) for row in rows] == \
        [("off", 0.0), ("off", 0.5), ("towers", 0.0), ("towers", 0.5)]
    # token dropping halves the image tower's FLOPs, counted (not assumed) by torch's FlopCounterMode
    assert rows[1]["train_flops_per_sample"] < rows[0]["train_flops_per_sample"]
    assert all(0 < row["mfu"] for row in rows)
    # "towers" compiles what engine.compile = "towers" does, one graph per tower ("step", which adds the loss and
    # the optimizer's update, takes minutes to compile LAMB on this CPU: run by hand, not here)
    assert rows[0]["graphs"] == {} and rows[2]["graphs"] == {"visual": 1, "text": 1}


def test_data_then_and_now_says_how_to_run_it():
    """bench/data_then_and_now.py (a tree's input pipeline against open_clip's) answers --help with its usage
    and runs under -S (no .pth hooks), as its usage line says."""
    r = subprocess.run([sys.executable, "-S", "-m", "bench.data_then_and_now", "--help"], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "python -S -m bench.data_then_and_now TREE SIZE SHARDS" in r.stderr, r.stderr
