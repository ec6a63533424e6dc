"""timm's own model tests (tests/test_models.py), run on every `steps_*` model.

Source: huggingface/pytorch-image-models, tests/test_models.py at aa4b5850 (1.0.29.dev0, the newest snapshot we
could fetch; the installed timm is 1.0.31). Taken, with the upstream assertions unchanged:

    upstream mark  case
    base           test_model_forward, test_model_backward
    cfg            test_model_default_cfgs, test_model_default_cfgs_non_std
    features       test_model_forward_features, test_model_forward_intermediates_features,
                   test_model_forward_intermediates

Adapted:
  * models: `list_models("steps_*")` instead of every timm model. Upstream's filters become this file's split:
    `steps_deit*` joins NON_STD_FILTERS (upstream routes `deit*` there: a ViT's features are tokens [B, N, C],
    no spatial pool size), and the three Steps modules join FEAT_INTER_FILTERS (all have
    `forward_intermediates` and a getter `features_only`).
  * marks: timm's `base` / `cfg` / `features` / `timeout` marks are not registered here, so they are dropped
    (the table above says which case had which; select with `-k`). The paper's S/B models and
    steps_resnet34/50 carry the registered `slow` mark; micro, T and steps_resnet18 run by default, in well
    under two minutes on 2 CPU cores (`-m "not slow"`).
  * input sizes and size limits are upstream's (`_get_input_size`, TARGET_* / MAX_*); CPU only
    (no TORCH_DEVICE / TORCH_BACKEND).
  * left out: pretrained loading and inference (no weights exist), torchscript and FX cases (other marks).

Run: .venv/bin/python -m pytest tests/models/test_timm_contract.py -q            (default set)
     .venv/bin/python -m pytest tests/models/test_timm_contract.py -q -m slow    (the heavy models)
"""
import fnmatch
import math

import pytest
import timm
import torch
from timm import create_model, get_pretrained_cfg_value, list_models
from timm.layers import get_channel_dim, get_spatial_dim

import models  # noqa: F401  (registers the steps_* models)

# models with forward_intermediates() and support for FeatureGetterNet features_only wrapper
FEAT_INTER_FILTERS = ["steps_deit", "steps_swin", "steps_resnet"]

# transformer / hybrid models don't support full set of spatial / feature APIs and/or have spatial output.
NON_STD_FILTERS = ["steps_deit*"]

HEAVY = ["steps_*_s", "steps_*_b", "steps_resnet34", "steps_resnet50"]

TARGET_FWD_SIZE = MAX_FWD_SIZE = 384
TARGET_BWD_SIZE = 128
MAX_BWD_SIZE = 320
MAX_FWD_OUT_SIZE = 448
TARGET_FFEAT_SIZE = 96
MAX_FFEAT_SIZE = 256

# models with extra conv/linear layers after pooling: none of the Steps models
EARLY_POOL_MODELS = ()


def _models(filter="steps_*", exclude_filters=(), module=None):
    names = list_models(filter, exclude_filters=list(exclude_filters), module=module or "")
    return [pytest.param(n, marks=pytest.mark.slow) if any(fnmatch.fnmatch(n, h) for h in HEAVY) else n
            for n in names]


def _get_input_size(model=None, model_name="", target=None):
    if model is None:
        assert model_name, "One of model or model_name must be provided"
        input_size = get_pretrained_cfg_value(model_name, "input_size")
        fixed_input_size = get_pretrained_cfg_value(model_name, "fixed_input_size")
        min_input_size = get_pretrained_cfg_value(model_name, "min_input_size")
    else:
        default_cfg = model.default_cfg
        input_size = default_cfg["input_size"]
        fixed_input_size = default_cfg.get("fixed_input_size", None)
        min_input_size = default_cfg.get("min_input_size", None)
    assert input_size is not None

    if fixed_input_size:
        return input_size

    if min_input_size:
        if target and max(input_size) > target:
            input_size = min_input_size
    else:
        if target and max(input_size) > target:
            input_size = tuple([min(x, target) for x in input_size])
    return input_size


def test_every_steps_model_is_covered():
    names = list_models("steps_*")
    assert len(names) == 12
    assert set(list_models("steps_*", module=FEAT_INTER_FILTERS)) == set(names)


# ----------------------------------------------------------------------------------------------- base


@pytest.mark.parametrize("model_name", _models())
@pytest.mark.parametrize("batch_size", [1])
def test_model_forward(model_name, batch_size):
    """Run a single forward pass with each model"""
    model = create_model(model_name, pretrained=False)
    model.eval()

    input_size = _get_input_size(model=model, target=TARGET_FWD_SIZE)
    if max(input_size) > MAX_FWD_SIZE:
        pytest.skip("Fixed input size model > limit.")
    inputs = torch.randn((batch_size, *input_size))
    outputs = model(inputs)

    assert outputs.shape[0] == batch_size
    assert not torch.isnan(outputs).any(), "Output included NaNs"

    # Test that grad-checkpointing, if supported, doesn't cause model failures or change in output
    try:
        model.set_grad_checkpointing()
    except Exception:
        # throws if not supported, that's fine
        pass
    else:
        outputs2 = model(inputs)
        if isinstance(outputs, tuple):
            outputs2 = torch.cat(outputs2)
        assert torch.allclose(outputs, outputs2, rtol=1e-4, atol=1e-5), "Output does not match"


@pytest.mark.parametrize("model_name", _models())
@pytest.mark.parametrize("batch_size", [2])
def test_model_backward(model_name, batch_size):
    """Run a single forward pass with each model"""
    input_size = _get_input_size(model_name=model_name, target=TARGET_BWD_SIZE)
    if max(input_size) > MAX_BWD_SIZE:
        pytest.skip("Fixed input size model > limit.")

    model = create_model(model_name, pretrained=False, num_classes=42)
    encoder_only = model.num_classes == 0  # FIXME better approach?
    num_params = sum([x.numel() for x in model.parameters()])
    model.train()

    inputs = torch.randn((batch_size, *input_size))
    outputs = model(inputs)
    if isinstance(outputs, tuple):
        outputs = torch.cat(outputs)
    outputs.mean().backward()
    for n, x in model.named_parameters():
        assert x.grad is not None, f"No gradient for {n}"
    num_grad = sum([x.grad.numel() for x in model.parameters() if x.grad is not None])

    if encoder_only:
        output_fmt = getattr(model, "output_fmt", "NCHW")
        feat_axis = get_channel_dim(output_fmt)
        assert outputs.shape[feat_axis] == model.num_features
    else:
        assert outputs.shape[-1] == 42
    assert num_params == num_grad, "Some parameters are missing gradients"
    assert not torch.isnan(outputs).any(), "Output included NaNs"


# ------------------------------------------------------------------------------------------------ cfg


@pytest.mark.parametrize("model_name", _models(exclude_filters=NON_STD_FILTERS))
@pytest.mark.parametrize("batch_size", [1])
def test_model_default_cfgs(model_name, batch_size):
    """Run a single forward pass with each model"""
    model = create_model(model_name, pretrained=False)
    model.eval()
    assert getattr(model, "num_classes") >= 0
    assert getattr(model, "num_features") > 0
    assert getattr(model, "head_hidden_size") > 0
    state_dict = model.state_dict()
    cfg = model.default_cfg

    pool_size = cfg["pool_size"]
    input_size = model.default_cfg["input_size"]
    output_fmt = getattr(model, "output_fmt", "NCHW")
    spatial_axis = get_spatial_dim(output_fmt)
    assert len(spatial_axis) == 2  # TODO add 1D sequence support
    feat_axis = get_channel_dim(output_fmt)

    if all([x <= MAX_FWD_OUT_SIZE for x in input_size]):
        # output sizes only checked if default res <= 448 * 448 to keep resource down
        input_size = tuple([min(x, MAX_FWD_OUT_SIZE) for x in input_size])
        input_tensor = torch.randn((batch_size, *input_size))

        # test forward_features (always unpooled) & forward_head w/ pre_logits
        outputs = model.forward_features(input_tensor)
        outputs_pre = model.forward_head(outputs, pre_logits=True)
        assert outputs.shape[spatial_axis[0]] == pool_size[0], f"unpooled feature shape {outputs.shape} != config"
        assert outputs.shape[spatial_axis[1]] == pool_size[1], f"unpooled feature shape {outputs.shape} != config"
        assert outputs.shape[feat_axis] == model.num_features
        assert outputs_pre.shape[1] == model.head_hidden_size

        # test forward after deleting the classifier, output should be poooled, size(-1) == model.num_features
        model.reset_classifier(0)
        assert model.num_classes == 0
        outputs = model.forward(input_tensor)
        assert len(outputs.shape) == 2
        assert outputs.shape[1] == model.head_hidden_size
        assert outputs.shape == outputs_pre.shape

        # test model forward after removing pooling and classifier
        if not isinstance(model, EARLY_POOL_MODELS):
            model.reset_classifier(0, "")  # reset classifier and disable global pooling
            outputs = model.forward(input_tensor)
            assert len(outputs.shape) == 4
            assert outputs.shape[spatial_axis[0]] == pool_size[0] and outputs.shape[spatial_axis[1]] == pool_size[1]

        # test classifier + global pool deletion via __init__
        if "pruned" not in model_name and not isinstance(model, EARLY_POOL_MODELS):
            model = create_model(model_name, pretrained=False, num_classes=0, global_pool="").eval()
            outputs = model.forward(input_tensor)
            assert len(outputs.shape) == 4
            assert outputs.shape[spatial_axis[0]] == pool_size[0] and outputs.shape[spatial_axis[1]] == pool_size[1]

    # check classifier name matches default_cfg
    if cfg.get("num_classes", None):
        classifier = cfg["classifier"]
        if not isinstance(classifier, (tuple, list)):
            classifier = classifier,
        for c in classifier:
            assert c + ".weight" in state_dict.keys(), f"{c} not in model params"

    # check first conv(s) names match default_cfg
    first_conv = cfg["first_conv"]
    if isinstance(first_conv, str):
        first_conv = (first_conv,)
    assert isinstance(first_conv, (tuple, list))
    for fc in first_conv:
        assert fc + ".weight" in state_dict.keys(), f"{fc} not in model params"


@pytest.mark.parametrize("model_name", _models(filter=NON_STD_FILTERS))
@pytest.mark.parametrize("batch_size", [1])
def test_model_default_cfgs_non_std(model_name, batch_size):
    """Run a single forward pass with each model"""
    model = create_model(model_name, pretrained=False)
    model.eval()
    assert getattr(model, "num_classes") >= 0
    assert getattr(model, "num_features") > 0
    assert getattr(model, "head_hidden_size") > 0
    state_dict = model.state_dict()
    cfg = model.default_cfg

    input_size = _get_input_size(model=model)
    if max(input_size) > 320:  # FIXME const
        pytest.skip("Fixed input size model > limit.")

    input_tensor = torch.randn((batch_size, *input_size))
    feat_dim = getattr(model, "feature_dim", None)

    outputs = model.forward_features(input_tensor)
    outputs_pre = model.forward_head(outputs, pre_logits=True)
    if isinstance(outputs, (tuple, list)):
        # cannot currently verify multi-tensor output.
        pass
    else:
        if feat_dim is None:
            feat_dim = -1 if outputs.ndim == 3 else 1
        assert outputs.shape[feat_dim] == model.num_features
        assert outputs_pre.shape[1] == model.head_hidden_size

    # test forward after deleting the classifier, output should be poooled, size(-1) == model.num_features
    model.reset_classifier(0)
    assert model.num_classes == 0
    outputs = model.forward(input_tensor)
    if isinstance(outputs, (tuple, list)):
        outputs = outputs[0]
    if feat_dim is None:
        feat_dim = -1 if outputs.ndim == 3 else 1
    assert outputs.shape[feat_dim] == model.head_hidden_size, "pooled num_features != config"
    assert outputs.shape == outputs_pre.shape

    model = create_model(model_name, pretrained=False, num_classes=0).eval()
    outputs = model.forward(input_tensor)
    if isinstance(outputs, (tuple, list)):
        outputs = outputs[0]
    if feat_dim is None:
        feat_dim = -1 if outputs.ndim == 3 else 1
    assert outputs.shape[feat_dim] == model.num_features

    # check classifier name matches default_cfg
    if cfg.get("num_classes", None):
        classifier = cfg["classifier"]
        if not isinstance(classifier, (tuple, list)):
            classifier = classifier,
        for c in classifier:
            assert c + ".weight" in state_dict.keys(), f"{c} not in model params"

    # check first conv(s) names match default_cfg
    first_conv = cfg["first_conv"]
    if isinstance(first_conv, str):
        first_conv = (first_conv,)
    assert isinstance(first_conv, (tuple, list))
    for fc in first_conv:
        assert fc + ".weight" in state_dict.keys(), f"{fc} not in model params"


# ------------------------------------------------------------------------------------------- features


def _check_features(expected_channels, expected_reduction, outputs, input_size, batch_size, output_fmt):
    feat_axis = get_channel_dim(output_fmt)
    spatial_axis = get_spatial_dim(output_fmt)
    assert len(expected_channels) == len(outputs)
    spatial_size = input_size[-2:]
    for e, r, o in zip(expected_channels, expected_reduction, outputs):
        assert e == o.shape[feat_axis]
        assert o.shape[spatial_axis[0]] <= math.ceil(spatial_size[0] / r) + 1
        assert o.shape[spatial_axis[1]] <= math.ceil(spatial_size[1] / r) + 1
        assert o.shape[0] == batch_size
        assert not torch.isnan(o).any()


@pytest.mark.parametrize("model_name", _models(exclude_filters=["*pruned*"] + NON_STD_FILTERS))
@pytest.mark.parametrize("batch_size", [1])
def test_model_forward_features(model_name, batch_size):
    """Run a single forward pass with each model in feature extraction mode"""
    model = create_model(model_name, pretrained=False, features_only=True)
    model.eval()
    expected_channels = model.feature_info.channels()
    expected_reduction = model.feature_info.reduction()
    assert len(expected_channels) >= 3  # all models here should have at least 3 default feat levels

    input_size = _get_input_size(model=model, target=TARGET_FFEAT_SIZE)
    if max(input_size) > MAX_FFEAT_SIZE:
        pytest.skip("Fixed input size model > limit.")
    output_fmt = getattr(model, "output_fmt", "NCHW")
    outputs = model(torch.randn((batch_size, *input_size)))
    _check_features(expected_channels, expected_reduction, outputs, input_size, batch_size, output_fmt)


@pytest.mark.parametrize("model_name", _models(module=FEAT_INTER_FILTERS, exclude_filters=["*pruned*"]))
@pytest.mark.parametrize("batch_size", [1])
def test_model_forward_intermediates_features(model_name, batch_size):
    """Run a single forward pass with each model in feature extraction mode"""
    model = create_model(model_name, pretrained=False, features_only=True, feature_cls="getter")
    model.eval()
    expected_channels = model.feature_info.channels()
    expected_reduction = model.feature_info.reduction()

    input_size = _get_input_size(model=model, target=TARGET_FFEAT_SIZE)
    if max(input_size) > MAX_FFEAT_SIZE:
        pytest.skip("Fixed input size model > limit.")
    output_fmt = getattr(model, "output_fmt", "NCHW")
    outputs = model(torch.randn((batch_size, *input_size)))
    _check_features(expected_channels, expected_reduction, outputs, input_size, batch_size, output_fmt)


@pytest.mark.parametrize("model_name", _models(module=FEAT_INTER_FILTERS, exclude_filters=["*pruned*"]))
@pytest.mark.parametrize("batch_size", [1])
def test_model_forward_intermediates(model_name, batch_size):
    """Run a single forward pass with each model in feature extraction mode"""
    model = create_model(model_name, pretrained=False)
    model.eval()
    feature_info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    expected_channels = feature_info.channels()
    expected_reduction = feature_info.reduction()
    assert len(expected_channels) >= 3  # all models here should have at least 3 feature levels

    input_size = _get_input_size(model=model, target=TARGET_FFEAT_SIZE)
    if max(input_size) > MAX_FFEAT_SIZE:
        pytest.skip("Fixed input size model > limit.")
    output_fmt = "NCHW"  # NOTE output_fmt determined by forward_intermediates() arg, not model attribute

    inpt = torch.randn((batch_size, *input_size))
    output, intermediates = model.forward_intermediates(
        inpt,
        output_fmt=output_fmt,
    )
    _check_features(expected_channels, expected_reduction, intermediates, input_size, batch_size, output_fmt)

    output2 = model.forward_features(inpt)
    assert torch.allclose(output, output2)

    # Test that grad-checkpointing, if supported
    try:
        model.set_grad_checkpointing()
    except Exception:
        # throws if not supported, that's fine
        pass
    else:
        output3, _ = model.forward_intermediates(
            inpt,
            output_fmt=output_fmt,
        )
        assert torch.allclose(output, output3, rtol=1e-4, atol=1e-5), "Output does not match"
