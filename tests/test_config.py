"""Config loading: YAML + dotted overrides into typed dataclasses, and start-up validation that
names the offending fields."""

import pytest

from engine.config import Config, ConfigError, load_config


def test_yaml_and_dotted_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("rollout:\n  group_size: 4\nalgorithm:\n  clip_high: 0.28\nreward:\n"
                    "  functions:\n    - {name: accuracy, fn: mc_accuracy, weight: 1.0}\n")
    cfg = load_config(str(path), ["rollout.temperature=0.7", "learner.lr=3e-6", "algorithm.dual_clip=3",
                                  "data.val=null", "trainer.resume=off"])
    assert cfg.trainer.run_name == "exp"
    assert cfg.rollout.group_size == 4 and cfg.rollout.temperature == 0.7
    assert cfg.learner.lr == 3e-6 and isinstance(cfg.algorithm.dual_clip, float)
    assert cfg.algorithm.clip_high == 0.28 and cfg.algorithm.clip_low == 0.2
    assert cfg.data.val is None
    assert cfg.trainer.resume == "off", "YAML 1.1 would read off as False"
    assert [f.fn for f in cfg.reward.functions] == ["mc_accuracy"]


def test_defaults_are_patho_r1():
    cfg = Config()
    assert [(f.name, f.fn, f.weight) for f in cfg.reward.functions] == [
        ("format", "patho_r1_format", 0.1), ("accuracy", "mc_accuracy", 0.9)]
    assert cfg.data.system_prompt.startswith("You are a pathology expert")


@pytest.mark.parametrize("override, message", [
    ("rollout.group_sise=4", "rollout.group_sise"),
    ("rollout.group_size=four", "rollout.group_size: expected int"),
    ("learner.betas=0.9", "learner.betas: expected a list"),
    ("nonsense", "expected section.field=value"),
])
def test_bad_keys_and_types_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(None, [override])


@pytest.mark.parametrize("overrides, fields", [
    (["algorithm.clip_high=0.1", "algorithm.clip_low=0.2"], ["algorithm.clip_high", "algorithm.clip_low"]),
    (["rollout.group_size=1"], ["algorithm.advantage", "rollout.group_size"]),
    (["algorithm.dynamic_sampling=true", "algorithm.filter_metric=acc"], ["algorithm.filter_metric"]),
    (["algorithm.overlong_buffer=64", "rollout.max_new_tokens=64"], ["algorithm.overlong_buffer"]),
    (["algorithm.dual_clip=0.5"], ["algorithm.dual_clip"]),
    (["rollout.prompts_per_step=6", "learner.mini_batches=4"], ["learner.mini_batches"]),
    (["model.reference=false", "algorithm.kl_loss_coef=0.01"], ["model.reference", "algorithm.kl_loss_coef"]),
    (["reward.functions=[{name: semantic, fn: judge_vllm}]"], ["reward.judge_model"]),
    (["learner.resources={learner_node: fast}", "rollout.resources={GPU: 1}"],
     ["learner.resources.learner_node", "rollout.resources.GPU"]),
    (["data.check_rows=-1"], ["data.check_rows"]),
    (["rollout.max_staleness=2", "algorithm.tis_cap=2"], ["rollout.max_staleness"]),
    (["rollout.max_staleness=1"], ["rollout.max_staleness", "algorithm.tis_cap"]),
    # NaN passes every `<` check; each of these once slipped through and trained with NaN weights,
    # no dual clip, no TIS cap or an overlong bonus.
    (["algorithm.tis_cap=.nan", "algorithm.dual_clip=.nan", "algorithm.clip_low=.nan"],
     ["algorithm.tis_cap must be a finite", "algorithm.dual_clip must be a finite", "algorithm.clip_low must be a finite"]),
    (["algorithm.tis_cap=.inf", "algorithm.kl_loss_coef=.nan", "learner.betas=[0.9, .nan]"],
     ["algorithm.tis_cap must be a finite", "algorithm.kl_loss_coef must be a finite", "learner.betas[1]"]),
    (["algorithm.overlong_factor=-1.0"], ["algorithm.overlong_factor"]),
    (["rollout.temperature=0.005", "trainer.eval_temperature=3"], ["rollout.temperature must be in [0.01, 2]",
                                                                   "trainer.eval_temperature must be in [0.01, 2]"]),
])
def test_impossible_combinations_fail_at_start(overrides, fields):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    for field in fields:
        assert field in str(err.value)


def test_base_files_merge_field_by_field(tmp_path):
    (tmp_path / "recipe.yaml").write_text("rollout:\n  group_size: 4\n  max_new_tokens: 2048\n"
                                          "algorithm:\n  clip_high: 0.28\n")
    (tmp_path / "small.yaml").write_text("base: recipe.yaml\nrollout:\n  max_new_tokens: 48\n")
    cfg = load_config(str(tmp_path / "small.yaml"), ["rollout.group_size=6"])
    assert (cfg.rollout.group_size, cfg.rollout.max_new_tokens, cfg.algorithm.clip_high) == (6, 48, 0.28)
    assert cfg.trainer.run_name == "small"
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(str(tmp_path / "loop.yaml"))


RECIPES = {  # file -> what the seed recipe fixes (docs/algorithms.md)
    "patho_r1_grpo": dict(reference=True, loss_agg="seq_mean_token_mean", clip=(0.2, 0.2), dynamic=False,
                          rewards=[("patho_r1_format", 0.1), ("mc_accuracy", 0.9)]),
    "patho_r1_dapo": dict(reference=False, loss_agg="token_mean", clip=(0.2, 0.28), dynamic=True,
                          rewards=[("mc_accuracy", 1.0)]),
    "pathreasoner_grpo": dict(reference=True, loss_agg="seq_mean_token_mean", clip=(0.2, 0.2), dynamic=False,
                              rewards=[("pathreasoner_format", 1.0), ("judge_vllm", 1.0), ("entity_dice", 0.5)]),
}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("suffix", ["", "_tiny"])
def test_recipe_presets(recipe, suffix):
    cfg = load_config(f"launch/configs/{recipe}{suffix}.yaml")
    want = RECIPES[recipe]
    a = cfg.algorithm
    assert cfg.uses_reference == want["reference"]
    assert (a.loss_agg, (a.clip_low, a.clip_high), a.dynamic_sampling) == (want["loss_agg"], want["clip"], want["dynamic"])
    assert [(f.fn, f.weight) for f in cfg.reward.functions] == want["rewards"]
    if recipe == "pathreasoner_grpo":
        assert (cfg.rollout.group_size, a.kl_estimator, a.kl_reward_coef, a.kl_loss_coef) == (4, "k1", 0.05, 0.0)
    if suffix:
        assert cfg.model.path == "artifacts/tiny-qwen2.5-vl" and cfg.learner.num_gpus == 0


def test_reference_model_only_when_some_kl_is_on():
    assert not load_config(None, []).uses_reference
    assert load_config(None, ["algorithm.kl_loss_coef=0.01"]).uses_reference
    assert load_config(None, ["algorithm.kl_reward_coef=0.05"]).uses_reference
