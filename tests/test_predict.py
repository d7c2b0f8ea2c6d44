"""jobs/predict.py: labelling recordings with a real aggregated ensemble.

The grid is trained for real on the demo assets (debug executor, a few steps): two
audio+text pairs, one audio-only pair and one pair whose top speech layer is fine-tuned,
2 head depths each, all 8 runs in the ensemble.
Its dev_probs.csv was written by the training jobs' own evaluation, so it is an
independent reference for what inference must reproduce.
"""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from ser_hpc.data.audio import load_audio
from ser_hpc.data.labels import EMOSPEECH_LABELS as LABELS
from ser_hpc.ensemble.members import resolve_backbone
from ser_hpc.inference.windows import window_starts
from tests.conftest import REPO
from tests.test_grid import write_grid

PY = sys.executable
_GRID: dict = {}  # one trained grid per session, even when another module imports the fixture


def read_probs(path: Path) -> dict[str, np.ndarray]:
    with open(path, newline="", encoding="utf-8") as fh:
        return {r["id"]: np.array([float(r[c]) for c in LABELS]) for r in csv.DictReader(fh)}


def write_csv(path: Path, rows: list[dict], columns=("id", "label", "transcription")) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture(scope="session")
def trained_grid(demo_assets, tmp_path_factory) -> Path:
    """results/<grid> of a real debug launch; its ensemble has every run as a member."""
    if "dir" in _GRID:
        return _GRID["dir"]
    tmp = tmp_path_factory.mktemp("predict_grid")
    corpus, bb = demo_assets["corpus"], demo_assets["backbones"]
    with open(corpus / "test.csv", newline="", encoding="utf-8") as fh:
        test_rows = list(csv.DictReader(fh))[:24]  # short dev and test splits keep the grid quick
    small_test = write_csv(tmp / "test_small.csv", test_rows, ("id", "transcription"))
    pairs = [{"name": "w2v+roberta", "speech": str(bb["wav2vec2-tiny"]), "text": str(bb["roberta-tiny"])},
             {"name": "wavlm+bert", "speech": str(bb["wavlm-tiny"]), "text": str(bb["bert-tiny"])},
             {"name": "w2v-audio", "speech": str(bb["wav2vec2-tiny"]), "model.modalities": "audio"},
             {"name": "w2v-ft+roberta", "speech": str(bb["wav2vec2-tiny"]), "text": str(bb["roberta-tiny"]),
              "model.speech.finetune_top_layers": 1}]
    path = write_grid(tmp, demo_assets, name="p", pairs=pairs, axes={"model.hidden_layers": [1, 2]},
                      overrides={"train.max_steps": 4, "train.eval_every": 2, "data.dev_fraction": 0.15,
                                 "data.test_csv": str(small_test)},
                      ensemble={"top_k": 8, "method": "mean"})
    res = subprocess.run([PY, str(REPO / "jobs" / "launch_grid.py"), str(path), "--cluster", "debug"], cwd=REPO,
                         capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-4000:]
    _GRID["dir"] = tmp / "results" / "p"
    return _GRID["dir"]


@pytest.fixture(scope="module")
def dev_table(trained_grid, demo_assets):
    """The dev clips with their transcriptions and labels, and the ensemble's dev scores."""
    probs = read_probs(trained_grid / "ensemble" / "dev_probs.csv")
    with open(demo_assets["corpus"] / "train.csv", newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r["id"] in probs]
    assert len(rows) == len(probs) > 30
    return rows, probs


@pytest.fixture(scope="module")
def audio_dir(demo_assets) -> Path:
    return demo_assets["corpus"] / "audio"


@pytest.fixture(scope="module")
def ensemble(trained_grid):
    from ser_hpc.inference.ensemble import load_ensemble
    return load_ensemble(trained_grid / "ensemble")


def predict_cli(*args, cwd=REPO):
    return subprocess.run([PY, str(REPO / "jobs" / "predict.py"), *map(str, args), "--no-progress"], cwd=cwd,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_ensemble_folder_is_self_contained(trained_grid):
    ens_dir = trained_grid / "ensemble"
    meta = json.loads((ens_dir / "ensemble.json").read_text())
    assert meta["labels"] == list(LABELS) and meta["method"] == "mean" and len(meta["members"]) == 8
    for m in meta["members"]:
        run = trained_grid / "runs" / m["run_id"]
        assert (ens_dir / m["head"]).read_bytes() == (run / "best_head.safetensors").read_bytes()
        assert (ens_dir / m["config"]).read_text() == (run / "config.yaml").read_text()
        assert (m["backbone_weights"] is not None) == (m["pair"] == "w2v-ft+roberta")
        if m["backbone_weights"]:
            assert (ens_dir / m["backbone_weights"]).read_bytes() == (run / "best_backbone.safetensors").read_bytes()
        assert Path(m["backbones"]["speech"]).is_dir()
        assert (m["backbones"]["text"] is None) == (m["modalities"] == "audio")
    assert sorted(p.name for p in (ens_dir / "members").iterdir()) == sorted(m["run_id"] for m in meta["members"])


@pytest.mark.slow
def test_predictions_reproduce_the_ensemble_dev_probs(audio_dir, trained_grid, dev_table, tmp_path):
    rows, want = dev_table
    csv_path = write_csv(tmp_path / "dev.csv", rows)
    out = tmp_path / "preds.csv"
    res = predict_cli(trained_grid / "ensemble", "--csv", csv_path, "--audio-dir", audio_dir, "--out", out,
                      "--batch-size", "5")
    assert res.returncode == 0, res.stderr[-3000:]
    got = read_probs(out)
    assert list(got) == [r["id"] for r in rows]  # input order
    for ident, p in got.items():
        np.testing.assert_allclose(p, want[ident], atol=1e-4, err_msg=ident)
    with open(out, newline="") as fh:
        assert [r["label"] for r in csv.DictReader(fh)] == [LABELS[int(np.argmax(want[r["id"]]))] for r in rows]
    meta = json.loads((trained_grid / "ensemble" / "ensemble.json").read_text())
    assert f"macro-F1 {meta['dev_macro_f1']:.4f} on {len(rows)} labelled row(s)" in res.stdout
    for name, f1 in meta["per_class_f1_dev"].items():
        assert f"  {name:<8} {f1:.4f}" in res.stdout


@pytest.mark.slow
def test_members_sharing_a_pair_share_one_backbone_forward(audio_dir, ensemble, dev_table, monkeypatch):
    from ser_hpc.inference.inputs import InputRow
    from ser_hpc.inference.predictor import predict
    from ser_hpc.models.backbones import FrozenBackbones

    # w2v+roberta hosts its own 2 heads and the 2 audio-only w2v heads; wavlm+bert its 2;
    # each fine-tuned run brings its own backbone weights, so it runs alone.
    assert sorted(len(g.members) for g in ensemble.groups) == [1, 1, 2, 4]
    assert len({id(g.backbones) for g in ensemble.groups}) == 4
    calls = []
    real = FrozenBackbones.forward
    monkeypatch.setattr(FrozenBackbones, "forward", lambda self, *a, **k: calls.append(id(self)) or real(self, *a, **k))
    rows, want = dev_table
    inputs = [InputRow(r["id"], audio_dir / r["id"], r["transcription"], None, k + 2) for k, r in enumerate(rows[:6])]
    result = predict(ensemble, inputs, batch_size=8, progress=False)
    assert len(calls) == 4 and len(set(calls)) == 4  # one batch: one forward per backbone group
    for k, r in enumerate(rows[:6]):
        np.testing.assert_allclose(result.probs[k], want[r["id"]], atol=1e-4)


@pytest.mark.slow
def test_long_clip_is_scored_over_averaged_windows(audio_dir, ensemble, dev_table, tmp_path):
    from ser_hpc.inference.inputs import InputRow
    from ser_hpc.inference.predictor import predict

    rows, _ = dev_table
    sr, clips = 16000, []
    for r in rows:
        clips.append(load_audio(audio_dir / r["id"], sr))
        if sum(map(len, clips)) >= 40 * sr:
            break
    long = np.concatenate(clips)[: 40 * sr]
    sf.write(tmp_path / "long.wav", long, sr, subtype="FLOAT")  # float wav: exact samples back
    window, hop = 15 * sr, int(7.5 * sr)
    starts = window_starts(len(long), window, hop)
    assert [s / sr for s in starts] == [0, 7.5, 15, 22.5, 25]  # last window ends at the clip's end
    text = rows[0]["transcription"]
    inputs = [InputRow("long.wav", tmp_path / "long.wav", text, None, 2)]
    for k, s in enumerate(starts):
        sf.write(tmp_path / f"w{k}.wav", long[s:s + window], sr, subtype="FLOAT")
        inputs.append(InputRow(f"w{k}.wav", tmp_path / f"w{k}.wav", text, None, 3 + k))
    result = predict(ensemble, inputs, batch_size=4, progress=False)
    assert not result.errors
    assert result.windows.tolist() == [5] + [1] * 5
    # Each member averages its windows; the mean ensemble of those equals the mean of the
    # windows' ensemble scores, which were computed as independent whole clips.
    np.testing.assert_allclose(result.member_probs[:, 0], result.member_probs[:, 1:].mean(axis=1), atol=1e-5)
    np.testing.assert_allclose(result.probs[0], result.probs[1:].mean(axis=0), atol=1e-5)
    assert abs(result.audio_s - 40 - 5 * 15) < 0.01
    # A longer window scores the clip whole: a different answer than the averaged windows.
    whole = predict(ensemble, inputs[:1], window_s=60, progress=False)
    assert whole.windows.tolist() == [1] and not np.allclose(whole.probs[0], result.probs[0], atol=1e-4)


@pytest.mark.slow
def test_missing_and_unreadable_audio_are_reported_and_the_rest_labelled(audio_dir, trained_grid, dev_table, tmp_path):
    rows, want = dev_table
    audio = tmp_path / "audio"
    audio.mkdir()
    for r in rows[:4]:
        shutil.copy(audio_dir / r["id"], audio / r["id"])
    (audio / "broken.mp3").write_bytes(b"\x00not audio" * 100)
    bad = [{"id": "gone.mp3", "label": "joy", "transcription": "hola"},
           {"id": "broken.mp3", "label": "", "transcription": "hola"}]
    csv_path = write_csv(audio / "in.csv", rows[:2] + bad + rows[2:4])
    out = tmp_path / "preds.csv"
    res = predict_cli(trained_grid / "ensemble", "--csv", csv_path, "--out", out)  # audio dir: the CSV's folder
    assert res.returncode == 1, res.stderr[-3000:]
    assert "2 row(s) not labelled" in res.stderr
    assert "row 4, id gone.mp3: audio file not found" in res.stderr
    assert "row 5, id broken.mp3: unreadable audio file" in res.stderr
    got = read_probs(out)
    assert list(got) == [r["id"] for r in rows[:4]]
    for ident, p in got.items():
        np.testing.assert_allclose(p, want[ident], atol=1e-4)
    assert "labelled 4 of 6 row(s)" in res.stdout


@pytest.mark.slow
def test_missing_transcription_falls_back_to_audio_only_members_or_fails(audio_dir, trained_grid, dev_table, tmp_path):
    rows, _ = dev_table
    meta = json.loads((trained_grid / "ensemble" / "ensemble.json").read_text())
    audio_only = [m["run_id"] for m in meta["members"] if m["modalities"] == "audio"]
    assert len(audio_only) == 2
    member = [read_probs(trained_grid / "runs" / rid / "dev_probs.csv") for rid in audio_only]
    no_text = [{**r, "transcription": ""} for r in rows[:3]]
    out = tmp_path / "preds.csv"
    res = predict_cli(trained_grid / "ensemble", "--csv", write_csv(tmp_path / "a.csv", no_text),
                      "--audio-dir", audio_dir, "--out", out)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "3 row(s) without a transcription" in res.stderr and all(a in res.stderr for a in audio_only)
    for ident, p in read_probs(out).items():  # the mean of the audio-only members alone
        np.testing.assert_allclose(p, np.mean([m[ident] for m in member], axis=0), atol=1e-4)

    # The same folder without its audio-only members cannot label them: a clear error.
    copy = tmp_path / "text_ensemble"
    shutil.copytree(trained_grid / "ensemble", copy)
    meta["members"] = [m for m in meta["members"] if m["modalities"] != "audio"]
    (copy / "ensemble.json").write_text(json.dumps(meta))
    res = predict_cli(copy, "--csv", write_csv(tmp_path / "b.csv", no_text[:1] + rows[3:5]), "--audio-dir",
                      audio_dir, "--out", tmp_path / "b_out.csv")
    assert res.returncode == 2
    assert "1 row(s) have no transcription (row 2, id " + rows[0]["id"] in res.stderr
    assert "every member of this ensemble uses text" in res.stderr
    assert not (tmp_path / "b_out.csv").exists()
    res = predict_cli(copy, "--audio", audio_dir / rows[0]["id"])
    assert res.returncode == 2 and "no transcription" in res.stderr


@pytest.mark.slow
def test_copied_folder_labels_one_clip_from_anywhere(audio_dir, trained_grid, dev_table, tmp_path):
    rows, want = dev_table
    elsewhere = tmp_path / "elsewhere" / "my_ensemble"
    shutil.copytree(trained_grid / "ensemble", elsewhere)
    runs, hidden = trained_grid / "runs", trained_grid / "runs.hidden"
    runs.rename(hidden)  # the copy must not need the run folders
    try:
        clip = rows[1]
        res = predict_cli("my_ensemble", "--audio", audio_dir / clip["id"], "--text", clip["transcription"],
                          cwd=elsewhere.parent)
    finally:
        hidden.rename(runs)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    assert lines[0] == f"label: {LABELS[int(np.argmax(want[clip['id']]))]}"
    probs = np.array([float(line.split()[1]) for line in lines[1:7]])
    assert [line.split()[0] for line in lines[1:7]] == list(LABELS)
    np.testing.assert_allclose(probs, want[clip["id"]], atol=1e-4)


def test_window_starts_and_backbone_resolution(tmp_path):
    assert window_starts(100, 150, 75) == [0]
    assert window_starts(150, 150, 75) == [0]
    assert window_starts(151, 150, 75) == [0, 1]
    assert window_starts(300, 150, 75) == [0, 75, 150]
    with pytest.raises(ValueError):
        window_starts(10, 0, 1)
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    assert resolve_backbone("models/tiny", tmp_path) == str(tmp_path / "models" / "tiny")
    assert resolve_backbone("./models/tiny", tmp_path) == str(tmp_path / "models" / "tiny")
    assert resolve_backbone("facebook/wav2vec2-xls-r-300m", tmp_path) == "facebook/wav2vec2-xls-r-300m"
    assert resolve_backbone("/abs/model", tmp_path) == "/abs/model"
    assert resolve_backbone(None, tmp_path) is None


@pytest.mark.slow
def test_bad_arguments_and_a_bad_folder(tmp_path):
    assert predict_cli(tmp_path).returncode == 2  # neither --csv nor --audio
    res = predict_cli(tmp_path, "--audio", tmp_path / "x.wav", "--text", "hola")
    assert res.returncode == 2 and "ensemble.json" in res.stderr and "not found" in res.stderr
