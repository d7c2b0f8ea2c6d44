"""jobs/export.py: a trained ensemble as a Hugging Face folder, ONNX graphs and a model card.

The ensemble is test_predict's real trained grid (two audio+text pairs, one audio-only pair,
one pair with a fine-tuned top speech layer; 8 members). Parity is measured against
predict.py's own function (predictor.predict on load_ensemble) on the grid's test clips,
all shorter than the 15 s window, so every clip is scored whole. The Hugging Face folder is
loaded in a fresh process, offline, from a folder with no ser_hpc import in sight.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from ser_hpc.data.audio import load_audio
from ser_hpc.data.labels import EMOSPEECH_LABELS as LABELS
from tests.conftest import REPO
from tests.test_predict import read_probs, trained_grid, write_csv  # noqa: F401  (the session's trained grid)

PY = sys.executable
TOL = 1e-4
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
# test_predict's module fixtures put it in this xdist group: share its worker, hence its grid.
pytestmark = pytest.mark.xdist_group("tests.test_predict")


def _export_main():
    spec = importlib.util.spec_from_file_location("export_job", REPO / "jobs" / "export.py")
    module = importlib.util.module_from_spec(spec)
    if str(REPO / "jobs") not in sys.path:
        sys.path.insert(0, str(REPO / "jobs"))  # for its `import _bootstrap`
    spec.loader.exec_module(module)
    return module.main


def export(*args) -> int:
    """jobs/export.py's main in this process (the CLI, without paying the imports again)."""
    return _export_main()([str(a) for a in args])


def run_py(code: str, *args, cwd: Path) -> subprocess.CompletedProcess:
    """Python in a fresh process, offline, outside the repository (so nothing imports ser_hpc by accident)."""
    script = cwd / "script.py"
    script.write_text(code)
    return subprocess.run([PY, str(script), *map(str, args)], cwd=cwd, env=OFFLINE, capture_output=True,
                          text=True, timeout=600)


def front_matter(readme: Path) -> dict:
    text = readme.read_text(encoding="utf-8")
    m = re.match(r"^---\n(.*?)\n---\n", text, re.S)
    assert m, "README.md has no YAML front matter"
    return yaml.safe_load(m.group(1))


@pytest.fixture(scope="module")
def grid_test(trained_grid):
    """The grid's test clips (all under 15 s) with transcriptions, and predict.py's probabilities on them."""
    from ser_hpc.inference.ensemble import load_ensemble
    from ser_hpc.inference.inputs import read_input_csv
    from ser_hpc.inference.predictor import predict

    cfg = yaml.safe_load(next((trained_grid / "ensemble" / "members").glob("*/config.yaml")).read_text())
    csv_path, audio_dir = Path(cfg["data"]["test_csv"]), Path(cfg["data"]["audio_dir"])
    rows = read_input_csv(csv_path, audio_dir, LABELS)
    result = predict(load_ensemble(trained_grid / "ensemble"), rows, progress=False)
    assert not result.errors and len(rows) == 24 and result.windows.tolist() == [1] * 24
    return {"csv": csv_path, "audio_dir": audio_dir, "rows": rows, "probs": result.probs, "pred": result.pred,
            "result": result}


@pytest.fixture(scope="module")
def hf_dir(trained_grid, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("export") / "hf"
    assert export(trained_grid / "ensemble", "--out", dest, "--format", "hf") == 0
    return dest


@pytest.fixture(scope="module")
def onnx_dir(trained_grid, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("export") / "onnx"
    assert export(trained_grid / "ensemble", "--out", dest, "--format", "onnx") == 0
    return dest


def _sub_ensemble(src: Path, dest: Path, keep, **meta_changes) -> Path:
    """A copy of an ensemble folder with only some members (and other ensemble.json changes)."""
    shutil.copytree(src, dest)
    meta = json.loads((dest / "ensemble.json").read_text())
    meta["members"] = [m for m in meta["members"] if keep(m)]
    meta.update(meta_changes)
    (dest / "ensemble.json").write_text(json.dumps(meta))
    return dest


# ----------------------------------------------------------------------------- Hugging Face
HF_SCRIPT = r"""
import json, sys
import numpy as np, torch
from transformers import AutoModelForAudioClassification
model = AutoModelForAudioClassification.from_pretrained(sys.argv[1], trust_remote_code=True)
data = np.load(sys.argv[2])
texts = json.loads(open(sys.argv[3], encoding="utf-8").read())
waves = [torch.from_numpy(data[f"w{i}"]) for i in range(len(texts))]
x = torch.zeros(len(waves), max(len(w) for w in waves))
mask = torch.zeros(x.shape, dtype=torch.long)
for i, w in enumerate(waves):
    x[i, : len(w)] = w
    mask[i, : len(w)] = 1
out = model(x, attention_mask=mask, text=texts)                # one padded batch
single = [model(waves[i][None], text=texts[i]).scores[0] for i in range(3)]  # one clip at a time
no_text = model(x[:2], attention_mask=mask[:2]).scores        # no transcription: audio-only members
extra = [model(torch.from_numpy(data[k])[None], text=texts[0]).scores[0] for k in ("long", "short")]
np.savez(sys.argv[4], batch=out.scores.numpy(), logits=out.logits.numpy(), single=torch.stack(single).numpy(),
         member=out.member_probs.numpy(), no_text=no_text.numpy(), extra=torch.stack(extra).numpy())
print(json.dumps({"ser_hpc_imported": any(m.split(".")[0] == "ser_hpc" for m in sys.modules),
                  "id2label": model.config.id2label, "class": type(model).__name__}))
"""


@pytest.mark.slow
def test_hf_folder_loads_offline_and_gives_predict_probabilities(hf_dir, grid_test, trained_grid, tmp_path):
    meta = json.loads((trained_grid / "ensemble" / "ensemble.json").read_text())
    cfg = json.loads((hf_dir / "config.json").read_text())
    assert cfg["id2label"] == {str(i): name for i, name in enumerate(LABELS)}
    assert cfg["label2id"] == {name: i for i, name in enumerate(LABELS)}
    assert cfg["auto_map"]["AutoModelForAudioClassification"] == \
        "modeling_ser_ensemble.SerEnsembleForAudioClassification"
    ensemble = [cfg["members"][i]["run_id"] for i in cfg["ensembles"][0]["members"]]
    assert ensemble == [m["run_id"] for m in meta["members"]]
    assert cfg["ensembles"][0]["method"] == "mean"
    # Backbones in subfolders, loaded by relative path: nothing points back at the grid.
    subfolders = sorted({g[k] for g in cfg["groups"] for k in ("speech", "text") if g[k]})
    assert subfolders == sorted(str(p.relative_to(hf_dir)) for p in (hf_dir / "backbones").iterdir())
    assert len([s for s in subfolders if "-ft-" in s]) == 2  # each fine-tuned member brings its own speech backbone
    for sub in subfolders:
        assert (hf_dir / sub / "config.json").is_file() and (hf_dir / sub / "model.safetensors").is_file()
    from safetensors import safe_open
    with safe_open(str(hf_dir / "model.safetensors"), "pt") as fh:
        assert fh.keys() and all(re.match(r"groups\.\d+\.heads\.\d+\.", k) for k in fh.keys())
    for name in ("configuration_ser_ensemble.py", "modeling_ser_ensemble.py", "pipeline_ser_ensemble.py"):
        code = (hf_dir / name).read_text()
        assert code == (REPO / "ser_hpc" / "export" / "remote" / name).read_text()  # copied verbatim
        assert "ser_hpc" not in re.findall(r"^\s*(?:from|import)\s+([\w.]+)", code, re.M)

    from ser_hpc.inference.ensemble import load_ensemble
    from ser_hpc.inference.inputs import InputRow
    from ser_hpc.inference.predictor import predict

    rows = grid_test["rows"]
    waves = [load_audio(r.audio_path, 16000) for r in rows]
    # A 40 s clip (scored over 15 s windows) and a 0.3 s one (repeat-padded to 0.5 s), as float wavs.
    extra = {"long": np.concatenate(waves)[: 40 * 16000], "short": waves[0][:4800]}
    for name, wave in extra.items():
        sf.write(tmp_path / f"{name}.wav", wave, 16000, subtype="FLOAT")
    want_extra = predict(load_ensemble(trained_grid / "ensemble"),
                         [InputRow(f"{k}.wav", tmp_path / f"{k}.wav", rows[0].text, None, 0) for k in extra],
                         progress=False)
    assert want_extra.windows.tolist() == [5, 1]
    np.savez(tmp_path / "clips.npz", **{f"w{i}": w for i, w in enumerate(waves)}, **extra)
    (tmp_path / "texts.json").write_text(json.dumps([r.text for r in rows], ensure_ascii=False), encoding="utf-8")
    res = run_py(HF_SCRIPT, hf_dir, tmp_path / "clips.npz", tmp_path / "texts.json", tmp_path / "out.npz",
                 cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info["ser_hpc_imported"] is False and info["class"] == "SerEnsembleForAudioClassification"
    out = np.load(tmp_path / "out.npz")
    want = grid_test["probs"]
    diff = float(np.abs(out["batch"] - want).max())
    print(f"hf vs predict.py: max abs diff {diff:.2e} over {len(rows)} test clips x {len(LABELS)} classes")
    assert diff < TOL
    np.testing.assert_allclose(out["single"], want[:3], atol=TOL)
    assert (out["batch"].argmax(1) == grid_test["pred"]).all()
    np.testing.assert_allclose(torch.softmax(torch.from_numpy(out["logits"]), -1).numpy(), out["batch"], atol=1e-6)
    # Without text the audio-only members label the clips alone, as predict.py does.
    audio_only = [i for i, m in enumerate(cfg["members"]) if m["modalities"] == "audio"]
    np.testing.assert_allclose(out["no_text"], out["member"][:2, audio_only].mean(1), atol=1e-6)
    np.testing.assert_allclose(out["extra"], want_extra.probs, atol=TOL)  # windows and repeat-padding too


PIPE_SCRIPT = r"""
import json, sys
from transformers import pipeline
audio = pipeline("audio-classification", model=sys.argv[1], trust_remote_code=True)
both = pipeline("audio-classification", model=sys.argv[2], trust_remote_code=True)
print(json.dumps({"audio": audio(sys.argv[3], top_k=None), "both": both(sys.argv[3], text=sys.argv[4], top_k=None),
                  "ser_hpc_imported": any(m.split(".")[0] == "ser_hpc" for m in sys.modules)}))
"""


@pytest.mark.slow
def test_pipeline_labels_a_wav_file(trained_grid, hf_dir, grid_test, tmp_path):
    from ser_hpc.inference.ensemble import load_ensemble
    from ser_hpc.inference.inputs import InputRow
    from ser_hpc.inference.predictor import predict

    # An audio-only ensemble: the grid's two audio-only members.
    audio_only = _sub_ensemble(trained_grid / "ensemble", tmp_path / "audio_only", lambda m: m["modalities"] == "audio")
    dest = tmp_path / "hf_audio"
    assert export(audio_only, "--out", dest) == 0
    row = grid_test["rows"][0]
    wav = tmp_path / "clip.wav"
    sf.write(wav, load_audio(row.audio_path, 16000), 16000, subtype="FLOAT")
    # The audio-only export, and the audio+text one with the documented text= argument.
    res = run_py(PIPE_SCRIPT, dest, hf_dir, wav, row.text, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["ser_hpc_imported"] is False
    print("pipeline:", out["audio"])
    want = predict(load_ensemble(audio_only), [InputRow(wav.name, wav, None, None, 0)], progress=False)
    got = {d["label"]: d["score"] for d in out["audio"]}
    assert sorted(got) == sorted(LABELS) and out["audio"][0]["label"] == LABELS[want.pred[0]]
    diff = max(abs(got[name] - p) for name, p in zip(LABELS, want.probs[0]))
    print(f"pipeline (audio-only) vs predict.py: max abs diff {diff:.2e}")
    assert diff < TOL
    scores = [d["score"] for d in out["audio"]]
    assert scores == sorted(scores, reverse=True)
    got = {d["label"]: d["score"] for d in out["both"]}
    np.testing.assert_allclose([got[name] for name in LABELS], grid_test["probs"][0], atol=TOL)


# ----------------------------------------------------------------------------- ONNX
@pytest.mark.slow
def test_onnx_graphs_give_predict_probabilities(onnx_dir, grid_test, trained_grid, tmp_path):
    import onnx

    from ser_hpc.inference.onnx_predictor import load_onnx_ensemble, predict_onnx

    manifest = json.loads((onnx_dir / "onnx_ensemble.json").read_text())
    assert manifest["labels"] == list(LABELS) and len(manifest["graphs"]) == 4  # one per backbone pair (+ tuned copies)
    for graph in manifest["graphs"]:
        model = onnx.load(str(onnx_dir / graph["graph"]))
        onnx.checker.check_model(model)
        dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
        assert dims == {"input_values": ["batch", "samples"], "wave_lengths": ["batch"],
                        "input_ids": ["batch", "tokens"], "text_attention_mask": ["batch", "tokens"]}
        side = json.loads((onnx_dir / graph["preprocessing"]).read_text())
        assert side["speech"]["sample_rate"] == 16000 and side["speech"]["normalize_in_graph"]
        assert (onnx_dir / side["text"]["tokenizer"] / "tokenizer.json").is_file()

    ens = load_onnx_ensemble(onnx_dir)
    result = predict_onnx(ens, grid_test["rows"], batch_size=5, progress=False)
    diff = float(np.abs(result.probs - grid_test["probs"]).max())
    print(f"onnx vs predict.py: max abs diff {diff:.2e} over {len(grid_test['rows'])} test clips")
    assert diff < TOL and (result.pred == grid_test["pred"]).all()

    # jobs/predict.py --onnx writes the CSV that predict.py writes from the ensemble folder
    # (output.predictions_csv of the same function's result): same rows, labels, columns.
    from ser_hpc.inference.output import predictions_csv

    ours, theirs = tmp_path / "onnx.csv", tmp_path / "torch.csv"
    theirs.write_text(predictions_csv(grid_test["result"]))
    res = subprocess.run([PY, str(REPO / "jobs" / "predict.py"), "--onnx", str(onnx_dir), "--csv",
                          str(grid_test["csv"]), "--audio-dir", str(grid_test["audio_dir"]), "--out", str(ours),
                          "--no-progress"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "labelled 24 of 24 row(s)" in res.stdout and "onnxruntime" in res.stdout
    with open(ours) as a, open(theirs) as b:
        ra, rb = list(csv.DictReader(a)), list(csv.DictReader(b))
    assert list(ra[0]) == list(rb[0]) == ["id", "label", *LABELS]
    assert [(r["id"], r["label"]) for r in ra] == [(r["id"], r["label"]) for r in rb]
    got, want = read_probs(ours), read_probs(theirs)
    assert max(float(np.abs(got[k] - want[k]).max()) for k in want) < 2e-6  # CSV rounding (6 decimals)


# ----------------------------------------------------------------------------- folds, vote
@pytest.mark.slow
def test_fold_ensemble_exports_the_fold_average_or_one_fold(trained_grid, grid_test, tmp_path):
    """A fold ensemble made of the grid's members: fold 1 mean (audio-only + w2v+roberta), fold 2 vote
    (wavlm+bert + audio-only); the export averages them as predict.py does, or keeps --fold 2."""
    from transformers import AutoModelForAudioClassification

    from ser_hpc.inference.ensemble import combine_fold_results, fold_ensemble_dirs, load_ensemble
    from ser_hpc.inference.onnx_predictor import load_onnx_ensemble, predict_onnx
    from ser_hpc.inference.predictor import predict

    src, top = trained_grid / "ensemble", tmp_path / "folds"
    top.mkdir()
    _sub_ensemble(src, top / "fold_1", lambda m: m["pair"] in ("w2v-audio", "w2v+roberta"), fold=1)
    _sub_ensemble(src, top / "fold_2", lambda m: m["pair"] in ("w2v-audio", "wavlm+bert"), fold=2, method="vote")
    (top / "ensemble.json").write_text(json.dumps({
        "kind": "folds", "labels": list(LABELS), "method": "mean", "fold_ensembles": ["fold_1", "fold_2"],
        "folds": [{"fold": 1, "dir": "fold_1"}, {"fold": 2, "dir": "fold_2"}]}))
    rows = grid_test["rows"][:8]
    per_fold = [predict(load_ensemble(d), rows, progress=False) for d in fold_ensemble_dirs(top)]
    want = combine_fold_results(per_fold).probs

    assert export(top, "--out", tmp_path / "hf") == 0
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert [(e["fold"], e["method"], len(e["members"])) for e in cfg["ensembles"]] == [(1, "mean", 4), (2, "vote", 4)]
    # w2v+roberta (fold 1, its audio-only heads included), w2v alone and wavlm+bert (fold 2)
    assert sorted((g["speech"], g["text"] or "") for g in cfg["groups"]) == [
        ("backbones/wav2vec2-tiny", ""), ("backbones/wav2vec2-tiny", "backbones/roberta-tiny"),
        ("backbones/wavlm-tiny", "backbones/bert-tiny")]
    model = AutoModelForAudioClassification.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True)
    waves = [torch.from_numpy(load_audio(r.audio_path, 16000)) for r in rows]
    x = torch.nn.utils.rnn.pad_sequence(waves, batch_first=True)
    mask = (torch.arange(x.shape[1])[None] < torch.tensor([len(w) for w in waves])[:, None]).long()
    got = model(x, attention_mask=mask, text=[r.text for r in rows]).scores.numpy()
    np.testing.assert_allclose(got, want, atol=TOL)

    assert export(top, "--out", tmp_path / "onnx2", "--format", "onnx", "--fold", "2") == 0
    result = predict_onnx(load_onnx_ensemble(tmp_path / "onnx2"), rows, progress=False)
    np.testing.assert_allclose(result.probs, per_fold[1].probs, atol=TOL)  # vote shares of fold 2
    assert (result.pred == per_fold[1].pred).all()


@pytest.mark.slow
def test_group_norm_backbone_runs_clip_by_clip(trained_grid, grid_test, tmp_path):
    """A speech encoder with a group-norm feature extractor (wav2vec2-base style: padding would
    change its output) under the audio-only members: ser_hpc runs it clip by clip, so must the
    Hugging Face model (per_clip) and the ONNX predictor (one clip per session run)."""
    from transformers import AutoModelForAudioClassification, Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    from ser_hpc.inference.ensemble import load_ensemble
    from ser_hpc.inference.onnx_predictor import load_onnx_ensemble, predict_onnx
    from ser_hpc.inference.predictor import predict

    torch.manual_seed(0)
    like = Wav2Vec2Config.from_pretrained(
        json.loads((trained_grid / "ensemble" / "ensemble.json").read_text())["members"][0]["backbones"]["speech"])
    cfg = Wav2Vec2Config(**{**like.to_dict(), "feat_extract_norm": "group", "do_stable_layer_norm": False})
    gn = tmp_path / "w2v-group-norm"
    Wav2Vec2Model(cfg).save_pretrained(gn)
    Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=True, return_attention_mask=False).save_pretrained(gn)
    ens_dir = _sub_ensemble(trained_grid / "ensemble", tmp_path / "gn_ens", lambda m: m["modalities"] == "audio")
    meta = json.loads((ens_dir / "ensemble.json").read_text())
    for m in meta["members"]:
        m["backbones"]["speech"] = str(gn)
    (ens_dir / "ensemble.json").write_text(json.dumps(meta))
    rows = grid_test["rows"][:5]
    want = predict(load_ensemble(ens_dir), rows, batch_size=5, progress=False).probs

    assert export(ens_dir, "--out", tmp_path / "hf") == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["groups"][0]["accepts_padding_mask"] is False
    model = AutoModelForAudioClassification.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True)
    waves = [torch.from_numpy(load_audio(r.audio_path, 16000)) for r in rows]
    x = torch.nn.utils.rnn.pad_sequence(waves, batch_first=True)
    mask = (torch.arange(x.shape[1])[None] < torch.tensor([len(w) for w in waves])[:, None]).long()
    np.testing.assert_allclose(model(x, attention_mask=mask).scores.numpy(), want, atol=TOL)

    assert export(ens_dir, "--out", tmp_path / "onnx", "--format", "onnx") == 0
    onnx_ens = load_onnx_ensemble(tmp_path / "onnx")
    assert [g.padded_batches for g in onnx_ens.groups] == [False]
    np.testing.assert_allclose(predict_onnx(onnx_ens, rows, batch_size=5, progress=False).probs, want, atol=TOL)


# ----------------------------------------------------------------------------- the model card
@pytest.mark.slow
def test_model_card_holds_the_figures(hf_dir, onnx_dir, trained_grid, demo_assets):
    meta = json.loads((trained_grid / "ensemble" / "ensemble.json").read_text())
    front = front_matter(hf_dir / "README.md")
    assert front["pipeline_tag"] == "audio-classification" and front["library_name"] == "transformers"
    assert front["language"] == ["es"]
    data = front["ser_hpc"]
    assert data["classes"] == list(LABELS) and data["method"] == ["mean"]
    figs = data["ensembles"][0]["figures"]
    for split, prefix in (("dev", "dev_"), ("test", "test_")):
        f = figs[split]
        assert f["macro_f1"] == round(meta[f"{prefix}macro_f1"], 4)
        assert f["macro_f1_ci95"] == [round(v, 4) for v in meta[f"{prefix}macro_f1_ci95"]]
        assert f["ua"] == round(meta["ua_dev" if split == "dev" else "test_ua"], 4)
        assert f["wa"] == round(meta["wa_dev" if split == "dev" else "test_wa"], 4)
        for k in ("ua", "wa"):
            assert f[f"{k}_ci95"][0] <= f[k] <= f[f"{k}_ci95"][1]
        assert f["ece"] == round(meta[f"{split}_ece"], 4)
        assert f["chance"]["uniform"] == round(meta["chance_macro_f1"][split]["uniform"], 4)
        assert f["chance"]["majority"] == round(meta["chance_macro_f1"][split]["majority"], 4)
    splits = data["ensembles"][0]["splits"]
    with open(demo_assets["corpus"] / "train.csv") as fh:
        n_train_csv = sum(1 for _ in csv.DictReader(fh))
    assert splits["dev"]["n"] == figs["dev"]["n"] == meta["n_dev"]
    assert splits["train"]["n"] + splits["dev"]["n"] == n_train_csv and splits["test"]["n"] == 24
    assert sum(splits["test"]["counts"].values()) == 24
    assert sorted(m["run_id"] for m in data["members"]) == sorted(m["run_id"] for m in meta["members"])
    assert {b["source"] for b in data["backbones"]} == {
        m["backbones"][k] for m in meta["members"] for k in ("speech", "text") if m["backbones"][k]}
    assert data["seeds"] == [1234]
    manifest = json.loads((trained_grid / "manifest.json").read_text())
    assert data["grid"]["git_commit"] == manifest["launches"][-1]["git_commit"] and data["grid"]["name"] == "p"
    metrics = {m["name"]: m["value"] for r in front["model-index"][0]["results"] for m in r["metrics"]}
    assert metrics["test macro-F1"] == round(meta["test_macro_f1"], 4)
    body = (hf_dir / "README.md").read_text()
    for heading in ("## How to use", "## Training data", "## Backbones", "## Ensemble members", "## Results",
                    "## Calibration", "## Seeds", "## Provenance", "## Intended use and limitations"):
        assert heading in body
    assert 'clf("clip.wav", text=' in body and "**Acted vs natural**" in body and "**Language**" in body
    assert "grid.yaml" in body and manifest["launches"][-1]["git_commit"] in body
    onnx_front = front_matter(onnx_dir / "README.md")
    assert onnx_front["library_name"] == "onnx" and onnx_front["ser_hpc"]["ensembles"] == data["ensembles"]
    assert "jobs/predict.py --onnx" in (onnx_dir / "README.md").read_text()


# ----------------------------------------------------------------------------- bad input
def _no_leftovers(parent: Path, name: str) -> None:
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")], list(parent.iterdir())


@pytest.mark.slow
def test_bad_inputs_exit_2_and_leave_no_destination(trained_grid, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    # Not an ensemble folder.
    (tmp_path / "empty").mkdir()
    assert export(tmp_path / "empty", "--out", out / "a") == 2
    assert f"{tmp_path / 'empty' / 'ensemble.json'} not found" in capsys.readouterr().err
    _no_leftovers(out, "a")
    # A backbone that cannot be found offline.
    gone = _sub_ensemble(trained_grid / "ensemble", tmp_path / "gone", lambda m: True)
    meta = json.loads((gone / "ensemble.json").read_text())
    for m in meta["members"]:
        if m["pair"] == "wavlm+bert":
            m["backbones"]["speech"] = str(tmp_path / "models" / "wavlm-gone")
    (gone / "ensemble.json").write_text(json.dumps(meta))
    assert export(gone, "--out", out / "b", "--format", "onnx") == 2
    assert "wavlm-gone" in capsys.readouterr().err
    _no_leftovers(out, "b")
    # A fine-tuned member whose backbone weights are truncated.
    broken = _sub_ensemble(trained_grid / "ensemble", tmp_path / "broken", lambda m: True)
    tuned = next(broken.glob("members/*/best_backbone.safetensors"))
    tuned.write_bytes(tuned.read_bytes()[:100])
    assert export(broken, "--out", out / "c") == 2
    err = capsys.readouterr().err
    assert str(tuned) in err and "corrupt or truncated" in err
    _no_leftovers(out, "c")
    # A member without its head file.
    headless = _sub_ensemble(trained_grid / "ensemble", tmp_path / "headless", lambda m: True)
    head = next(headless.glob("members/w2v-audio*/best_head.safetensors"))
    head.unlink()
    assert export(headless, "--out", out / "d") == 2
    assert f"{head} not found" in capsys.readouterr().err
    _no_leftovers(out, "d")
    # --fold on an ensemble without folds; an existing destination.
    assert export(trained_grid / "ensemble", "--out", out / "e", "--fold", "1") == 2
    assert "--fold applies only to those" in capsys.readouterr().err
    _no_leftovers(out, "e")
    (out / "f").mkdir()
    (out / "f" / "mine.txt").write_text("keep")
    assert export(trained_grid / "ensemble", "--out", out / "f") == 2
    assert "already exists" in capsys.readouterr().err and (out / "f" / "mine.txt").read_text() == "keep"
    # jobs/predict.py --onnx on a folder that is not an ONNX export.
    spec = importlib.util.spec_from_file_location("predict_job", REPO / "jobs" / "predict.py")
    predict_job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(predict_job)
    csv_path = write_csv(tmp_path / "in.csv", [{"id": "x.wav", "label": "", "transcription": "hola"}])
    assert predict_job.main(["--onnx", str(trained_grid / "ensemble"), "--csv", str(csv_path),
                             "--out", str(tmp_path / "p.csv")]) == 2
    assert f"{(trained_grid / 'ensemble').resolve() / 'onnx_ensemble.json'} not found" in capsys.readouterr().err
    assert not (tmp_path / "p.csv").exists()


def test_staged_folder_leaves_nothing_behind_on_failure(tmp_path):
    from ser_hpc.export import ExportError
    from ser_hpc.export.staging import staged_folder

    with pytest.raises(RuntimeError):
        with staged_folder(tmp_path / "dest") as tmp:
            (tmp / "half.bin").write_bytes(b"x" * 10)
            raise RuntimeError("killed half-way")
    assert list(tmp_path.iterdir()) == []
    with staged_folder(tmp_path / "dest") as tmp:
        (tmp / "whole.bin").write_bytes(b"y")
    assert [p.name for p in tmp_path.iterdir()] == ["dest"] and (tmp_path / "dest" / "whole.bin").read_bytes() == b"y"
    with pytest.raises(ExportError, match="already exists"):
        with staged_folder(tmp_path / "dest"):
            pass
    with staged_folder(tmp_path / "dest", overwrite=True) as tmp:
        (tmp / "new.bin").write_bytes(b"z")
    assert sorted(p.name for p in (tmp_path / "dest").iterdir()) == ["new.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["dest"]


# ----------------------------------------------------------------------------- the head mirror
@pytest.mark.parametrize("fusion,pooling,attn,layers", [
    ("early", "attention", 0, "weighted"), ("late", "mean", 4, "weighted_all"),
    ("late", "attentive_stats", 0, "last"), ("early", "mean", 2, "last")])
def test_exported_head_is_ser_hpc_emotion_head(fusion, pooling, attn, layers):
    """The standalone head (remote/modeling_ser_ensemble.py) takes EmotionHead's weights and gives
    its logits, for head settings the trained grid does not use (late fusion, other poolings,
    self-attention, layer modes)."""
    from ser_hpc.config import ModelConfig
    from ser_hpc.export.build import _head_spec
    from ser_hpc.export.remote.modeling_ser_ensemble import EmotionHead as Exported
    from ser_hpc.models.encoders import BackboneOutput
    from ser_hpc.models.head import EmotionHead

    torch.manual_seed(0)
    cfg = ModelConfig(fusion=fusion, pooling=pooling, fusion_attention_heads=attn, head_width=32, hidden_layers=2)
    cfg.speech.layers, cfg.text.layers = layers, "weighted"
    ours = EmotionHead(cfg, (4, 24), (3, 16), 6).eval()
    for p in ours.parameters():
        torch.nn.init.normal_(p, std=0.3)
    theirs = Exported(_head_spec(cfg), (4, 24), (3, 16), 6).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    speech, text = torch.randn(4, 3, 9, 24), torch.randn(3, 3, 5, 16)
    smask = torch.arange(9)[None] < torch.tensor([9, 6, 3])[:, None]
    tmask = torch.arange(5)[None] < torch.tensor([5, 2, 4])[:, None]
    with torch.no_grad():
        want = ours(BackboneOutput(speech, smask, text, tmask))
        got = theirs(speech, smask, text, tmask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_remote_code_imports_only_torch_and_transformers():
    for path in (REPO / "ser_hpc" / "export" / "remote").glob("*.py"):
        imports = set(re.findall(r"^\s*(?:from|import)\s+([\w.]+)", path.read_text(), re.M))
        roots = {name.split(".")[0] for name in imports if not name.startswith(".")}
        allowed = {"__future__", "math", "dataclasses", "numpy", "torch", "transformers", "soundfile"}
        assert roots <= allowed, (path, roots)
