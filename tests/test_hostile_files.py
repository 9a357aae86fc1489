"""Hostile and broken files in a runs folder: nothing runs code, every bad run is explained.

One good tiny run is trained once; beside it, one run folder per attack or accident:
a pickle payload renamed to model.safetensors (plain pickle and torch.save's zip form),
model.pt / model.pth payloads instead of safetensors, a truncated safetensors file, a
safetensors file with the right names but wrong shapes, a safetensors header that lies,
a config.json that is not JSON, a config naming an unknown model, and a metrics.jsonl
whose last line was cut mid-write. Every payload, if unpickled, creates a marker file;
after every step the test checks that the marker does not exist.

Checked: core.engine.runs.list_runs (one-line reasons, the good run kept), load_model,
`python -m core runs --dir D` and `python -m core evaluate --run BAD` (one line, exit 2,
no traceback), the app's home page through Streamlit's AppTest (renders, shows the broken
runs as broken), and the CIFAR-10 reader's restricted unpickler (refuses the payload).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from core.cli import main
from core.engine.config import TrainConfig
from core.engine.runs.listing import list_runs
from core.engine.runs.reader import RunError, load_model, read_metrics
from core.engine.trainer import train
from core.models.resnet import build_model

ROOT = Path(__file__).resolve().parents[1]
DS = "features10:train=32,val=16"


class _System:
    """Unpickling this runs a shell command (os.system)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class _Open:
    """Unpickling this creates a file (builtins.open in write mode)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """(runs folder, marker path, names of the broken runs -> words their reason must contain)."""
    base = tmp_path_factory.mktemp("hostile")
    marker = base.parent / f"{base.name}-PWNED"
    runs = base / "runs"
    good = runs / "a_good"
    cfg = TrainConfig(model="resnet20", dataset=DS, policy="avg2+mask", epochs=1, steps=2, batch_size=16,
                      eval_batch_size=16, log_every=1, fidelity_every=0, num_threads=1, device="cpu",
                      progress=False, out=str(good))
    assert train(cfg).status == "finished"

    def clone(name: str) -> Path:
        return Path(shutil.copytree(good, runs / name))

    payload = {"state_dict": build_model("resnet20").state_dict(), "x": _System(marker), "y": _Open(marker)}
    # a plain pickle renamed to model.safetensors (protocol 4 and protocol 0, which has no magic byte)
    (clone("pickle_renamed") / "model.safetensors").write_bytes(pickle.dumps(payload, protocol=4))
    (clone("pickle_p0_renamed") / "model.safetensors").write_bytes(pickle.dumps(_System(marker), protocol=0))
    # torch.save's zip-with-pickle format renamed
    torch.save(payload, clone("torchsave_renamed") / "model.safetensors")
    # model.pt / model.pth instead of safetensors, beside a valid config
    d = clone("pt_only")
    (d / "model.safetensors").unlink()
    torch.save(payload, d / "model.pt")
    (d / "model.pth").write_bytes(pickle.dumps(_Open(marker)))
    # a .pt payload beside good weights: the run stays usable, the .pt is noted as refused
    torch.save(payload, clone("pt_beside_good") / "model.pt")
    # truncated safetensors
    d = clone("truncated")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 3])
    # right names, wrong shapes
    d = clone("wrong_shapes")
    sd = build_model("resnet20").state_dict()
    save_file({k: torch.zeros(*(s + 1 for s in v.shape)) if v.ndim else v for k, v in sd.items()},
              str(d / "model.safetensors"))
    # a header that claims more data than the file holds
    d = clone("lying_header")
    header = json.dumps({"fc.weight": {"dtype": "F32", "shape": [10, 64], "data_offsets": [0, 2560]}}).encode()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    # config.json that is not JSON (binary junk, and a cut object)
    (clone("config_binary") / "config.json").write_bytes(b"\x80\x04\x95junk\xff\xfe")
    (clone("config_cut") / "config.json").write_text('{"model": "resnet20", "policy": ')
    # unknown model
    d = clone("unknown_model")
    c = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**c, "model": "resnet7; rm -rf /"}))
    # metrics.jsonl with its last line cut mid-write: tolerated, noted
    with open(clone("metrics_cut") / "metrics.jsonl", "a") as f:
        f.write('{"type": "step", "step": 3, "lo')
    broken = {
        "pickle_renamed": "refused", "pickle_p0_renamed": "corrupt", "torchsave_renamed": "refused",
        "pt_only": "not found", "truncated": "corrupt or truncated", "wrong_shapes": "does not fit",
        "lying_header": "corrupt", "config_binary": "config.json", "config_cut": "not valid JSON",
        "unknown_model": "unknown model",
    }
    assert not marker.exists()
    yield runs, marker, broken
    marker.unlink(missing_ok=True)


def test_list_runs_explains_every_broken_run_and_keeps_the_good(hostile):
    runs_dir, marker, broken = hostile
    runs = {r.name: r for r in list_runs([runs_dir], include_default=False)}
    assert not marker.exists()
    assert set(runs) == {"a_good", "pt_beside_good", "metrics_cut", *broken}
    assert runs["a_good"].status == "finished" and runs["a_good"].reason is None and not runs["a_good"].notes
    for name, words in broken.items():
        r = runs[name]
        assert r.status == "broken", (name, r.status)
        assert r.reason and "\n" not in r.reason and words in r.reason, (name, r.reason)
        assert "Traceback" not in r.reason
    assert any("model.pt" in n and "refused" in n for n in runs["pt_only"].notes)
    assert any("model.pth" in n and "refused" in n for n in runs["pt_only"].notes)
    assert runs["pt_beside_good"].status == "finished"
    assert any("model.pt" in n and "refused" in n for n in runs["pt_beside_good"].notes)
    assert runs["metrics_cut"].status == "finished"
    assert any("cut mid-write" in n for n in runs["metrics_cut"].notes)
    log = read_metrics(runs_dir / "metrics_cut")
    assert log.skipped == [(len(log) + 1, "last line cut mid-write")] and log.evals
    assert not marker.exists()


def test_load_model_refuses_with_a_run_error(hostile):
    runs_dir, marker, broken = hostile
    for name in broken:
        with pytest.raises(RunError) as e:
            load_model(runs_dir / name)
        assert "\n" not in str(e.value), name
        assert not marker.exists(), name
    load_model(runs_dir / "a_good")
    load_model(runs_dir / "pt_beside_good")  # the safetensors weights; the .pt is never opened
    assert not marker.exists()


def test_cli_runs_and_evaluate_give_one_line_errors(hostile, capsys):
    runs_dir, marker, broken = hostile
    # `runs` lists every run, one line each, the reason on the broken ones; it does not fail
    assert main(["runs", "--dir", str(runs_dir)]) == 0
    out = capsys.readouterr().out
    assert not marker.exists()
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.strip()}
    for name, words in broken.items():
        assert "broken" in lines[name] and words in lines[name], lines[name]
    assert "finished" in lines["a_good"]
    for name in broken:
        assert main(["evaluate", "--run", str(runs_dir / name), "--device", "cpu"]) == 2, name
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, (name, err)
        assert not marker.exists(), name


def test_cli_in_a_subprocess_prints_no_traceback(hostile):
    """The same through a real `python -m core` (what a user types)."""
    runs_dir, marker, _ = hostile
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for args, code in [(["runs", "--dir", str(runs_dir)], 0),
                       (["evaluate", "--run", str(runs_dir / "pickle_renamed"), "--device", "cpu"], 2),
                       (["evaluate", "--run", str(runs_dir / "pt_only"), "--device", "cpu"], 2)]:
        p = subprocess.run([sys.executable, "-m", "core", *args], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=300)
        assert p.returncode == code, (args, p.stderr[-2000:])
        assert "Traceback" not in p.stderr and "Traceback" not in p.stdout, p.stderr[-2000:]
        if code == 2:
            assert p.stderr.strip().startswith("error: ") and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert not marker.exists()


def test_app_lists_the_broken_runs_without_crashing(hostile, monkeypatch):
    from streamlit.testing.v1 import AppTest

    runs_dir, marker, broken = hostile
    monkeypatch.setenv("POOLPROP_RUN_DIRS", str(runs_dir))
    monkeypatch.setenv("POOLPROP_RUNS_ROOT", str(runs_dir))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    assert not marker.exists()
    table = at.dataframe[0].value
    by_folder = {Path(f).name: (s, n) for f, s, n in zip(table["folder"], table["status"], table["note"])}
    for name, words in broken.items():
        status, note = by_folder[name]
        assert status.startswith("broken") and words in note, (name, status, note)
    assert by_folder["a_good"][0].startswith("finished")
    assert any("cannot be used" in str(w.value) for w in at.warning)
    # only usable runs can be picked
    picker = at.sidebar.multiselect[0]
    assert len(picker.options) == 3 and all(any(n in o for n in ("a_good", "pt_beside_good", "metrics_cut"))
                                            for o in picker.options), picker.options
    assert not marker.exists()


def test_cifar_reader_refuses_the_payload(tmp_path):
    from core.engine.data.cifar10 import _read_cifar_pickle

    marker = tmp_path / "PWNED"
    for i, obj in enumerate([{b"data": _System(marker), b"labels": []}, {b"labels": _Open(marker)}]):
        for proto in (0, 2, 4):
            path = tmp_path / f"data_batch_{i}_{proto}"
            path.write_bytes(pickle.dumps(obj, protocol=proto))
            with pytest.raises(pickle.UnpicklingError, match="not allowed"):
                _read_cifar_pickle(path)
            assert not marker.exists()
