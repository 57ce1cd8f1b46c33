"""`amisbench timing` on CPU: the peak memory of each method is its own (one process per method)."""

import json
import os

from amisbench import cli, timing


def test_cpu_peak_memory_is_per_method(tmp_path, capsys):
    assert cli.main(["timing", "--method", "ssn,unet", "--dataset", "synthetic", "--profile", "smoke", "--untrained",
                     "--samples", "2", "--images", "1", "--warmup", "0", "--results", str(tmp_path)]) == 0
    recs = [json.loads((tmp_path / "timing" / "cpu" / f"synthetic__{m}.json").read_text()) for m in ("ssn", "unet")]
    assert len({r["pid"] for r in recs} | {os.getpid()}) == 3  # two processes, neither this one
    assert all(r["memory_kind"] == timing.PER_PROCESS and r["peak_memory_bytes"] > 0 for r in recs)
    assert capsys.readouterr().out.count(timing.PER_PROCESS) == 2  # the report says what the column measures
    # timed one after the other in one process (the Python API), the second record says it is not its own
    kw = dict(samples=2, images=1, warmup=0, profile="smoke", untrained=True, results=tmp_path, save=False)
    first, second = timing.time_method("ssn", "synthetic", **kw), timing.time_method("unet", "synthetic", **kw)
    assert "not this method's own" in second["memory_kind"] and first["pid"] == second["pid"] == os.getpid()
