import json

from tests.conftest import run_cli


def test_ingest_bench_measures_every_figure(tmp_path):
    out = tmp_path / "b"
    r = run_cli("bench", "--ingest", "--out", str(out), "--runs", "1000", "--n-test", "20",
                "--n-train", "60", "--classes", "3")
    assert r.returncode == 0, r.stderr
    d = json.loads((out / "bench-ingest.json").read_text())
    assert d["files"] == 2 and d["runs"] == 1000
    for key in ("read_cold_s", "read_warm_s", "torch_load_s", "stats_s", "write_s",
                "matmul_s"):
        assert d[key] > 0
    for n in ("1", "2"):
        assert d["ingest"][n]["gb_s"] > 0
        assert "bottleneck:" in d["ingest"][n]["summary"]
    assert d["files_to_kernel"]["seconds"] > d["kernel"]["seconds"] > 0
    assert d["kernel"]["summary"].startswith("kernel: test-train 20x60 runs 1000")
    best = d["files_to_kernel"]["converters"]
    assert d["ingest"][str(best)]["seconds"] == min(v["seconds"] for v in d["ingest"].values())
    assert d["startup_s"] > 0
    assert 0 < d["ingest_startup_s"] < d["startup_s"]  # no torch in an ingest on the CPU
    assert d["files_to_kernel"]["floor_s"] == (d["write_s"] + d["matmul_s"] + d["startup_s"]
                                               + d["ingest_startup_s"])
    assert d["reference"]["seconds"] > 0
    assert "files -> kernel / published" in r.stdout
    assert not (out / "src").exists() and not (out / "store").exists()
    assert not (out / "write-floor").exists()
