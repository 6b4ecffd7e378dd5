"""Job configs: every shipped YAML loads against its job's config class; merge order; errors name keys."""

from pathlib import Path

import pytest

from jobs.config import CONFIG_DIR
from jobs.lora import LoraJobConfig
from jobs.stage1 import Stage1JobConfig
from jobs.stage2 import Stage2JobConfig
from pipelines.config import ConfigError, load_config, save_config

CLASSES = {"stage1": Stage1JobConfig, "stage2": Stage2JobConfig, "lora": LoraJobConfig}


def config_class(path: Path):
    """The job config class a shipped YAML belongs to, from its file name."""
    matches = [cls for key, cls in CLASSES.items() if key in path.stem]
    assert len(matches) == 1, f"no single job config class for {path.name}: {matches}"
    return matches[0]


def test_every_job_has_shipped_yamls():
    """Each job's config class has at least one YAML in jobs/configs (so the test below covers it)."""
    shipped = {config_class(p) for p in CONFIG_DIR.glob("*.yaml")}
    assert shipped == set(CLASSES.values())


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_yaml_loads(path):
    """Each YAML in jobs/configs loads with no unknown key and valid values, and has root and corpus."""
    config = load_config(config_class(path), path)
    assert config.root and config.corpus


def test_merge_order_defaults_yaml_overrides(tmp_path):
    """defaults < YAML < key.sub=value overrides, down to nested keys."""
    yaml = tmp_path / "c.yaml"
    yaml.write_text("corpus: from_yaml\noptim: {lr: 0.5, max_steps: 7}\n")
    config = load_config(Stage1JobConfig, yaml, ["optim.lr=0.25", "scaling.num_workers=4"])
    assert config.corpus == "from_yaml" and config.optim.max_steps == 7
    assert config.optim.lr == 0.25 and config.scaling.num_workers == 4
    assert config.optim.weight_decay == 0.05  # untouched default


def test_unknown_keys_and_bad_values_name_the_key(tmp_path):
    """An unknown key, a wrongly typed value, an out-of-range value and a missing corpus each fail naming the key."""
    with pytest.raises(ConfigError, match="optim.lrr"):
        load_config(Stage1JobConfig, None, ["corpus=c", "optim.lrr=1"])
    with pytest.raises(ConfigError, match="scaling.num_workers"):
        load_config(Stage1JobConfig, None, ["corpus=c", "scaling.num_workers=many"])
    with pytest.raises(ValueError, match="scaling.num_workers"):
        load_config(Stage1JobConfig, None, ["corpus=c", "scaling.num_workers=0"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(Stage1JobConfig, None, ["corpus=c", "optim.lr"])
    with pytest.raises(ValueError, match="corpus is required"):
        load_config(Stage1JobConfig, None, [])


def test_resolved_config_round_trips(tmp_path):
    """The saved resolved YAML loads back to an equal config."""
    config = load_config(Stage2JobConfig, CONFIG_DIR / "tiny_stage2.yaml", ["stage1=/x"])
    path = save_config(config, tmp_path / "resolved.yaml")
    assert load_config(Stage2JobConfig, path) == config


def test_paper_defaults_are_the_published_ones():
    """Stage 1 defaults to lr 3e-5 (warmup from 3e-7, cosine to 3e-6), stage 2 to lr 1e-4; wd 0.05."""
    s1, s2 = Stage1JobConfig(corpus="c"), Stage2JobConfig(corpus="c")
    assert (s1.optim.lr, s1.optim.warmup_start_lr, s1.optim.min_lr, s1.optim.warmup_steps) == (
        3e-5,
        3e-7,
        3e-6,
        2000,
    )
    assert (s2.optim.lr, s2.optim.weight_decay, s2.optim.warmup_steps) == (1e-4, 0.05, 2000)
    assert (s2.task.vq_weight, s2.task.recon_weight, s2.task.gen_weight) == (5.0, 2.0, 0.5)
