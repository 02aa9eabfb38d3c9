"""Config loading, overrides and validation: errors name the key and the value."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from trainer import config
from trainer.errors import ConfigError

pytestmark = pytest.mark.timeout(60)

CONFIGS = sorted(Path("configs").glob("*.toml"))


def write(tmp_path, text):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_loads(path):
    cfg = config.load(path)
    assert cfg.model.topk <= cfg.model.experts


def test_paper_model_configs_are_all_present():
    names = {p.stem for p in CONFIGS}
    assert {
        "tiny",
        "internal-352b",
        "mixtral-8x7b",
        "mixtral-8x22b",
        "hunyuan-large",
        "phi-3.5-moe",
        "deepseekmoe",
    } <= names


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key model\.hiden"):
        config.load(write(tmp_path, "[model]\nhiden = 64\n"))


def test_unknown_section_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown section \[modle\]"):
        config.load(write(tmp_path, "[modle]\nhidden = 64\n"))


def test_kv_heads_must_divide_heads(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.heads = 8 .*model\.kv_heads = 3"):
        config.load(write(tmp_path, "[model]\nhidden = 64\nheads = 8\nkv_heads = 3\n"))


def test_topk_greater_than_experts(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.topk = 9 must be <= model\.experts = 8"):
        config.load(write(tmp_path, "[model]\nexperts = 8\ntopk = 9\n"))


def test_wrong_type_names_key_and_value(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.layers = 'two' must be of type int"):
        config.load(write(tmp_path, '[model]\nlayers = "two"\n'))


def test_bad_choice_lists_the_allowed_values():
    with pytest.raises(ConfigError, match=r"parallel\.ffn = 'ep' must be one of ep_a2a"):
        config.apply_overrides(config.Config(), ["parallel.ffn=ep"])


def test_pipeline_stages_must_divide_the_layers():
    # One rule for the pipeline: every stage holds the same number of layers.
    with pytest.raises(
        ConfigError, match=r"model\.layers = 3 must be divisible by parallel\.pp = 2"
    ):
        config.apply_overrides(config.Config(), ["model.layers=3", "parallel.pp=2"])
    assert config.apply_overrides(config.Config(), ["model.layers=4", "parallel.pp=2"])


def test_experts_must_divide_over_n():
    with pytest.raises(ConfigError, match=r"model\.experts = 8 .* parallel\.n = 3"):
        config.apply_overrides(config.Config(), ["parallel.n=3"])


def test_malformed_toml_names_the_file(tmp_path):
    path = write(tmp_path, "[model\nhidden = 64\n")
    with pytest.raises(ConfigError, match=r"run\.toml is not valid TOML"):
        config.load(path)


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        config.load("no/such/config.toml")


def test_overrides_are_parsed_by_field_type():
    cfg = config.apply_overrides(
        config.Config(),
        [
            "train.steps=7",
            "train.lr=1e-3",
            "comm.overlap=true",
            "parallel.attention=tp",
            "data.path='some dir'",
            "model.capacity_factor=2",
        ],
    )
    assert cfg.train.steps == 7
    assert cfg.train.lr == 1e-3
    assert cfg.comm.overlap is True
    assert cfg.parallel.attention == "tp"
    assert cfg.data.path == "some dir"
    assert cfg.model.capacity_factor == 2.0


@pytest.mark.parametrize(
    "item,pattern",
    [
        ("train.steps=ten", r"train\.steps = 'ten' must be of type int"),
        ("comm.fp8=maybe", r"comm\.fp8 = 'maybe' must be a boolean"),
        ("train.stepz=1", r"unknown key train\.stepz"),
        ("steps=1", r"must look like section\.key"),
        ("train.steps", r"must look like section\.key=value"),
        ("train.steps=0", r"train\.steps = 0 must be > 0"),
        ("train.lr=-1", r"train\.lr = -1\.0 must be >= 0"),
    ],
)
def test_bad_overrides(item, pattern):
    with pytest.raises(ConfigError, match=pattern):
        config.apply_overrides(config.Config(), [item])


def test_config_is_frozen():
    cfg = config.Config()
    with pytest.raises(AttributeError):
        cfg.model.hidden = 3  # type: ignore[misc]


def test_config_module_imports_no_torch():
    code = "import sys, trainer.config; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_readme_documents_every_key():
    readme = Path("README.md").read_text()
    for name, section in config.SECTIONS.items():
        for f in dataclasses.fields(section):
            assert f"`{name}.{f.name}`" in readme, (
                f"{name}.{f.name} missing from README's configuration reference"
            )


def test_an_override_can_complete_a_file(tmp_path):
    """The rules between keys are checked after the overrides: a file that checkpoints
    without naming a directory runs with --set checkpoint.dir=..., and fails without."""
    path = tmp_path / "c.toml"
    path.write_text("[checkpoint]\ninterval = 5\n")
    assert config.load(path, ["checkpoint.dir=/tmp/x"]).checkpoint.dir == "/tmp/x"
    with pytest.raises(ConfigError, match=r"checkpoint\.interval = 5 needs checkpoint\.dir"):
        config.load(path)


@pytest.mark.parametrize(
    "overrides,pattern",
    [
        (["parallel.virtual_stages=0"], r"parallel\.virtual_stages = 0 must be > 0"),
        (
            ["parallel.virtual_stages=2"],
            r"parallel\.virtual_stages = 2 needs parallel\.pp > 1 \(got parallel\.pp = 1\)",
        ),
        (
            ["model.layers=4", "parallel.pp=2", "parallel.virtual_stages=4"],
            r"model\.layers = 4 must be divisible by parallel\.pp \* parallel\.virtual_stages "
            r"= 2 \* 4 = 8",
        ),
        (  # 16 / (1 * 16) = 1 micro-batch: fewer than pp
            ["model.layers=4", "parallel.pp=2", "parallel.virtual_stages=2"],
            r"16 / \(1 \* 16\) = 1, to be a multiple of parallel\.pp = 2",
        ),
        (  # 12 / (1 * 4) = 3 micro-batches: not whole rounds of pp
            [
                "model.layers=4",
                "parallel.pp=2",
                "parallel.virtual_stages=2",
                "train.global_batch=12",
                "train.micro_batch=4",
            ],
            r"12 / \(1 \* 4\) = 3, to be a multiple of parallel\.pp = 2",
        ),
    ],
)
def test_bad_virtual_stages_name_the_numbers(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        config.apply_overrides(config.Config(), overrides)


def test_virtual_stages_accept_whole_rounds_of_pp():
    cfg = config.apply_overrides(
        config.Config(),
        ["model.layers=8", "parallel.pp=2", "parallel.virtual_stages=2", "train.micro_batch=4"],
    )
    assert cfg.parallel.virtual_stages == 2
    assert cfg.micro_batches_per_replica == 4
    assert config.Config().parallel.virtual_stages == 1
