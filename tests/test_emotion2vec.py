"""emotion2vec without fairseq (ser_hpc.models.emotion2vec), checked against FunASR's own module.

The reference: FunASR's ``funasr.models.emotion2vec.model.Emotion2vec`` (the class its
AutoModel builds for emotion2vec checkpoints), random-initialised from a tiny config in
FunASR's config.yaml format, its state dict saved as model.pt + config.yaml and loaded back
through our path. FunASR scores one clip at a time (``inference``: ``F.layer_norm(wav,
wav.shape)`` then ``extract_features(wav[None], padding_mask=None)``), so each clip of a
padded batch is compared with FunASR on that clip alone. FunASR is a test dependency only
(the dev extra); the tests that need it skip without it.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from ser_hpc.models.emotion2vec import (
    CONFIG_FILE, WEIGHTS_FILE, Emotion2VecEncoder, Emotion2VecError, emotion2vec_config, is_emotion2vec_folder,
    perturb_, save_random_emotion2vec, write_emotion2vec_folder,
)

TOL = 1e-5
LENGTHS = [8123, 16000, 3217, 400]  # 0.5 s, 1 s, 0.2 s, the shortest clip with a frame (25 ms)
VARIANTS = {
    # emotion2vec's own settings, small: post-LN blocks, layer-norm conv extractor, ALiBi
    # with a learned scale per head, extra tokens, waveform normalisation, odd pos-conv kernel.
    "base": dict(),
    # every other branch FunASR has: group-norm conv extractor (run clip by clip), pre-LN
    # blocks with the final norm, pre-LN positional convs with an even kernel (SamePad),
    # ALiBi scales per layer on 2 of 4 heads, no extra tokens, no normalisation.
    "branches": dict(extractor_mode="default", layer_norm_first=True, conv_pos_pre_ln=True, alibi_scale_per_layer=True,
                     num_alibi_heads=2, conv_pos_width=12, conv_pos_depth=3, prenet_depth=2, num_extra_tokens=0,
                     normalize=False),
    "no-alibi": dict(use_alibi=False, prenet_depth=0, depth=3, mlp_ratio=4.0, num_extra_tokens=3, embed_dim=48),
}
MEASURED: dict[str, list[float]] = {}  # printed at the end of the module (pytest -s)


def _waves(lengths, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    waves = torch.zeros(len(lengths), max(lengths), dtype=dtype)
    for i, n in enumerate(lengths):  # DC offset and scale: the normalisation has work to do
        waves[i, :n] = (0.3 * torch.randn(n, generator=g) + 0.05).to(dtype)
    return waves, torch.tensor(lengths)


@pytest.fixture(scope="module")
def funasr_class():
    module = pytest.importorskip("funasr.models.emotion2vec.model",
                                 reason="FunASR (the reference) is not installed: pip install -e '.[dev]'")
    return module.Emotion2vec


def reference_states(ref, config: dict, wave: torch.Tensor) -> torch.Tensor:
    """FunASR on one clip, as its ``inference`` runs it -> [L, F, D]: the input of its first
    block (after the positional convs and the prenet) and each block's output, extra tokens
    dropped."""
    captured = []
    hooks = [ref.blocks[0].register_forward_pre_hook(lambda m, args: captured.append(args[0]))]
    hooks += [blk.register_forward_hook(lambda m, args, out: captured.append(out[0])) for blk in ref.blocks]
    extra = config["model_conf"]["modalities"]["audio"]["num_extra_tokens"]
    try:
        with torch.no_grad():
            source = F.layer_norm(wave, wave.shape) if ref.cfg.normalize else wave
            out = ref.extract_features(source.view(1, -1), padding_mask=None)
            states = torch.stack([c[0, extra:] for c in captured])
            if ref.norm is not None:  # pre-LN: FunASR's output is the last block's, normalised
                states[-1] = ref.norm(states[-1])
    finally:
        for h in hooks:
            h.remove()
    assert torch.equal(states[-1], out["x"][0])  # our last state is FunASR's output x
    return states


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, funasr_class, tmp_path_factory):
    """(FunASR reference, our encoder loaded from its saved state dict, its config)."""
    torch.manual_seed(0)
    config = emotion2vec_config(**VARIANTS[request.param])
    ref = perturb_(funasr_class(model_conf=config["model_conf"]), seed=1).eval()
    folder = write_emotion2vec_folder(tmp_path_factory.mktemp(f"e2v-{request.param}"), config, ref.state_dict())
    return request.param, ref, Emotion2VecEncoder(folder), config


def _record(name: str, diffs: torch.Tensor):
    old = MEASURED.get(name)
    MEASURED[name] = diffs.tolist() if old is None else [max(a, b) for a, b in zip(old, diffs.tolist())]


def test_every_layer_matches_funasr_clip_alone(pair):
    variant, ref, enc, config = pair
    assert enc.num_states == len(ref.blocks) + 1 and enc.width == config["model_conf"]["embed_dim"]
    waves, lengths = _waves(LENGTHS)
    for i, n in enumerate(LENGTHS):
        expected = reference_states(ref, config, waves[i, :n])
        states, mask = enc(waves[i:i + 1, :n], lengths[i:i + 1])
        assert states.shape == (enc.num_states, 1, expected.shape[1], enc.width)
        assert int(enc.frame_lengths(lengths[i:i + 1])) == expected.shape[1] == int(mask.sum())
        diffs = (states[:, 0] - expected).abs().amax(dim=(1, 2))
        _record(f"{variant} alone", diffs)
        assert (diffs <= TOL).all(), f"{variant}, {n} samples: max |diff| per layer {diffs.tolist()}"


def test_padded_batch_matches_funasr_clip_by_clip(pair):
    """Each clip of a padded batch gets FunASR's values for that clip alone (FunASR's own
    batched path with a padding mask does not: its positional convs read the padding)."""
    variant, ref, enc, config = pair
    waves, lengths = _waves(LENGTHS, seed=1)
    states, mask = enc(waves, lengths)
    frames = enc.frame_lengths(lengths)
    assert states.shape == (enc.num_states, len(LENGTHS), int(frames.max()), enc.width)
    assert torch.equal(mask.sum(1), frames)
    assert not states[:, ~mask].any()  # padded frames are zero
    for i, n in enumerate(LENGTHS):
        expected = reference_states(ref, config, waves[i, :n])
        diffs = (states[:, i, : int(frames[i])] - expected).abs().amax(dim=(1, 2))
        _record(f"{variant} in a padded batch", diffs)
        assert (diffs <= TOL).all(), f"{variant}, {n} samples in a batch: max |diff| per layer {diffs.tolist()}"


def test_port_is_exact_in_double_precision(pair):
    """In float64 the remaining differences come from the float32 softmax (and ALiBi scores)
    both implementations use: the port computes the same function, padding included."""
    variant, ref, enc, config = pair
    ref64, enc64 = ref.double(), enc.double()
    try:
        waves, lengths = _waves(LENGTHS, seed=2, dtype=torch.float64)
        states, _ = enc64(waves, lengths)
        for i, n in enumerate(LENGTHS):
            expected = reference_states(ref64, config, waves[i, :n])
            diffs = (states[:, i, : expected.shape[1]] - expected).abs().amax(dim=(1, 2))
            _record(f"{variant} float64 batch", diffs)
            assert (diffs <= 1e-6).all(), diffs.tolist()
    finally:
        ref.float(), enc.float()


def test_random_checkpoint_is_in_funasr_format(funasr_class, tmp_path):
    """save_random_emotion2vec writes what FunASR itself loads (strictly) and runs alike."""
    folder = save_random_emotion2vec(tmp_path / "tiny", seed=3)
    config = yaml.safe_load((folder / CONFIG_FILE).read_text())
    ref = funasr_class(model_conf=config["model_conf"]).eval()
    ref.load_state_dict(torch.load(folder / WEIGHTS_FILE, weights_only=True), strict=True)
    enc = Emotion2VecEncoder(folder)
    waves, lengths = _waves([5000])
    states, _ = enc(waves, lengths)
    diffs = (states[:, 0] - reference_states(ref, config, waves[0])).abs().amax(dim=(1, 2))
    assert (diffs <= TOL).all(), diffs.tolist()


# ---------------------------------------------------------------- without FunASR

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_random_emotion2vec(tmp_path_factory.mktemp("e2v-tiny") / "tiny", seed=0)


@pytest.mark.parametrize("mode", ["layer_norm", "default"])
def test_a_clip_is_the_same_alone_and_in_a_padded_batch(tmp_path, mode):
    folder = save_random_emotion2vec(tmp_path / mode, seed=4, extractor_mode=mode)
    enc = Emotion2VecEncoder(folder)
    assert enc.accepts_padding_mask == (mode == "layer_norm")
    lengths = [3217, 16000, 401, 12345, 8000]
    waves, lens = _waves(lengths, seed=5)
    waves[0, 3217:] = 7.0  # whatever the padding holds
    states, mask = enc(waves, lens)
    for i, n in enumerate(lengths):
        alone, alone_mask = enc(waves[i:i + 1, :n], lens[i:i + 1])
        f = alone.shape[2]
        assert int(mask[i].sum()) == f and bool(alone_mask.all())
        diff = (states[:, i, :f] - alone[:, 0]).abs().max().item()
        assert diff <= TOL, (mode, n, diff)


def test_attributes_frames_and_frozen(tiny):
    enc = Emotion2VecEncoder(tiny)
    assert (enc.sample_rate, enc.width, enc.num_states, enc.frame_rate, enc.min_samples) == (16000, 32, 3, 50.0, 400)
    # wav2vec 2.0's conv arithmetic: 49 frames per second of audio, 1 at 25 ms
    assert enc.frame_lengths(torch.tensor([16000, 48000, 400, 399, 719, 720])).tolist() == [49, 149, 1, 0, 1, 2]
    assert is_emotion2vec_folder(tiny) and not enc.ignored_keys
    enc.train()
    assert not enc.model.training and not any(p.requires_grad for p in enc.parameters())
    waves, lengths = _waves([4000, 2000])
    states, mask = enc(waves, lengths)
    assert states.dtype == torch.float32 and mask.dtype == torch.bool and not states.requires_grad
    with pytest.raises(Emotion2VecError, match="399 samples.*at least 400"):
        enc(waves[:, :399], torch.tensor([399, 399]))


def test_checkpoint_layouts_funasr_accepts(tiny, tmp_path):
    """model.pt under a "model" key, DDP's "module." prefix, and keys outside the encoder
    (the pretraining decoder, the "+" models' emotion head, others) load; same result."""
    state = torch.load(tiny / WEIGHTS_FILE, weights_only=True)
    wrapped = {f"module.{k}": v for k, v in state.items()}
    wrapped["modality_encoders.AUDIO.decoder.proj.weight"] = torch.zeros(32, 16)
    wrapped["proj.weight"], wrapped["proj.bias"] = torch.zeros(9, 32), torch.zeros(9)
    wrapped["cls_proj.weight"] = torch.zeros(4, 4)
    folder = tmp_path / "wrapped"
    folder.mkdir()
    (folder / CONFIG_FILE).write_text((tiny / CONFIG_FILE).read_text())
    torch.save({"model": wrapped, "epoch": 3}, folder / WEIGHTS_FILE)
    enc = Emotion2VecEncoder(folder)
    assert sorted(enc.ignored_keys) == ["cls_proj.weight", "modality_encoders.AUDIO.decoder.proj.weight",
                                        "proj.bias", "proj.weight"]
    waves, lengths = _waves([4000])
    assert torch.equal(enc(waves, lengths)[0], Emotion2VecEncoder(tiny)(waves, lengths)[0])


def _broken(tiny, tmp_path, name):
    folder = tmp_path / name
    folder.mkdir()
    config = yaml.safe_load((tiny / CONFIG_FILE).read_text())
    state = torch.load(tiny / WEIGHTS_FILE, weights_only=True)
    write = lambda: write_emotion2vec_folder(folder, config, state)  # noqa: E731
    if name == "no model.pt":
        write(); (folder / WEIGHTS_FILE).unlink()
    elif name == "no config.yaml":
        write(); (folder / CONFIG_FILE).unlink()
    elif name == "garbage model.pt":
        write(); (folder / WEIGHTS_FILE).write_bytes(b"this is not a checkpoint")
    elif name == "truncated model.pt":
        write(); data = (folder / WEIGHTS_FILE).read_bytes(); (folder / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    elif name == "bad yaml":
        write(); (folder / CONFIG_FILE).write_text("model: Emotion2vec\nmodel_conf: [unclosed\n")
    elif name == "other model":
        config["model"] = "Paraformer"; write()
    elif name == "no embed_dim":
        del config["model_conf"]["embed_dim"]; write()
    elif name == "missing tensor":
        del state["blocks.1.attn.qkv.weight"]; write()
    elif name == "unexpected tensor":  # a third block for a 2-block config
        state["blocks.2.attn.qkv.weight"] = torch.zeros(96, 32); write()
    elif name == "learned alibi":
        state["modality_encoders.AUDIO.alibi_bias"] = torch.zeros(1, 4, 8, 8); write()
    elif name == "wrong shapes":
        config["model_conf"]["mlp_ratio"] = 4.0; write()
    return folder


@pytest.mark.parametrize("name,file,words", [
    ("no model.pt", WEIGHTS_FILE, "weights not found"),
    ("no config.yaml", CONFIG_FILE, "config not found"),
    ("garbage model.pt", WEIGHTS_FILE, "cannot read the checkpoint"),
    ("truncated model.pt", WEIGHTS_FILE, "cannot read the checkpoint"),
    ("bad yaml", CONFIG_FILE, "not readable YAML"),
    ("other model", CONFIG_FILE, "'Paraformer', not Emotion2vec"),
    ("no embed_dim", CONFIG_FILE, "model_conf.embed_dim is missing"),
    ("missing tensor", WEIGHTS_FILE, "missing .*blocks.1.attn.qkv.weight"),
    ("unexpected tensor", WEIGHTS_FILE, "unexpected .*blocks.2.attn.qkv.weight"),
    ("wrong shapes", WEIGHTS_FILE, "mlp.fc1.weight has shape"),
    ("learned alibi", WEIGHTS_FILE, "unexpected .*modality_encoders.AUDIO.alibi_bias"),
])
def test_broken_folders_fail_naming_the_file(tiny, tmp_path, name, file, words):
    folder = _broken(tiny, tmp_path, name)
    with pytest.raises(Emotion2VecError, match=words) as err:
        Emotion2VecEncoder(folder)
    assert str(folder / file) in str(err.value)
    probe_fails = name in ("no model.pt", "no config.yaml", "bad yaml", "other model")
    assert is_emotion2vec_folder(folder) is not probe_fails


def test_not_a_folder(tmp_path):
    with pytest.raises(Emotion2VecError, match="folder does not exist"):
        Emotion2VecEncoder(tmp_path / "nowhere")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    assert not is_emotion2vec_folder(tmp_path / "hf") and not is_emotion2vec_folder(tmp_path / "nowhere")


def test_runs_without_funasr_or_fairseq(tiny):
    """Loading and running a checkpoint imports neither FunASR nor fairseq."""
    code = ("import sys, torch; from ser_hpc.models.emotion2vec import Emotion2VecEncoder; "
            f"enc = Emotion2VecEncoder({str(tiny)!r}); enc(torch.randn(1, 4000), torch.tensor([4000])); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'funasr', 'fairseq', 'omegaconf'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def teardown_module(module):
    if MEASURED:
        print("\nmax |ours - FunASR| per state (0 = after the prenet, then each block):")
        for name, diffs in MEASURED.items():
            print(f"  {name:32s} " + " ".join(f"{d:.1e}" for d in diffs))
