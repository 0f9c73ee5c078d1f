"""Preference training: the DPO / IPO / hinge / ORPO / SimPO losses and their gradients against float64 formulas
written here from the papers, the reference model at step 0, and `litft finetune dpo|orpo|simpo` end to end."""

from __future__ import annotations

import contextlib
import copy
import csv
import json
import math
from pathlib import Path

import pytest
import torch

from litft.adapters.lora import LoRAConfig, LoRALinear
from litft.commands.finetune import load_for_training
from litft.data import DataConfig, load_preference_datasets
from litft.training.loss import CausalLMObjective
from litft.training.preference import (
    DPOConfig,
    FrozenReference,
    ORPOConfig,
    PreferenceObjective,
    SimPOConfig,
    adapters_disabled,
    base_model_reference,
    sequence_log_probs,
)

CPU = torch.device("cpu")


def lora_model(checkpoint: Path, dora: bool = False, perturb: bool = True):
    """A float32 LoRA model on every linear layer; `perturb` gives B random values so the policy differs from the
    base (at initialisation B is zero and they are equal)."""
    torch.manual_seed(0)
    model = load_for_training("lora", checkpoint, torch.float32, CPU, LoRAConfig(rank=4, targets=["all-linear"], dora=dora), None)
    if perturb:
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, LoRALinear):
                    module.lora_B.weight.normal_(0, 0.05)
    return model


def real_pairs(checkpoint: Path, data_dir: Path, tmp_path: Path) -> list[dict]:
    """Two pairs of plain strings and two of message lists, rendered with the plain template."""
    from litft.chat_templates import resolve_chat_template
    from litft.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_checkpoint(checkpoint)
    template = resolve_chat_template(tokenizer, "plain")
    pairs = []
    for name in ("oasst_pairs_99.jsonl", "oasst_pairs_212.conversational.jsonl"):
        config = DataConfig(path=str(data_dir / "preference" / name), limit=2, max_seq_length=255,
                            cache_dir=str(tmp_path / "cache"))
        train, _ = load_preference_datasets(config, tokenizer, template, log=lambda message: None)
        pairs += train
    return pairs


def float64_sequence_log_prob(model, sample) -> torch.Tensor:
    """log p(completion | prompt) of one sample, alone (no padding), from the full float64 logits."""
    input_ids, targets = sample["input_ids"][None], sample["targets"][None]
    logits = model.logits(model.hidden_states(input_ids)).double()
    trained = targets != -100
    token_log_probs = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return token_log_probs[trained].sum()


def paper_loss(name: str, config, policy_w, policy_l, ref_w, ref_l, length_w, length_l) -> torch.Tensor:
    """One pair's loss, written from each paper's definition (w = chosen / winner, l = rejected / loser)."""
    sigmoid = torch.sigmoid
    if name in ("sigmoid", "sigmoid_smoothed", "hinge", "ipo"):
        beta = config.beta
        if name == "ipo":  # Azar et al.: (h - 1/(2 tau))^2 on per-token averaged log-likelihood ratios
            h = (policy_w - ref_w) / length_w - (policy_l - ref_l) / length_l
            return (h - 1 / (2 * beta)) ** 2
        h = beta * ((policy_w - ref_w) - (policy_l - ref_l))
        if name == "hinge":
            return torch.clamp(1 - h, min=0)
        e = config.label_smoothing
        return -(1 - e) * torch.log(sigmoid(h)) - e * torch.log(sigmoid(-h))
    if name == "orpo":  # Hong et al.: odds(y) = P / (1 - P), P = exp(mean token log-likelihood)
        p_w, p_l = torch.exp(policy_w / length_w), torch.exp(policy_l / length_l)
        odds_w, odds_l = p_w / (1 - p_w), p_l / (1 - p_l)
        return -policy_w / length_w - config.odds_ratio_weight * torch.log(sigmoid(torch.log(odds_w / odds_l)))
    # SimPO, Meng et al.
    margin = config.beta / length_w * policy_w - config.beta / length_l * policy_l - config.gamma
    e = config.label_smoothing
    return -(1 - e) * torch.log(sigmoid(margin)) - e * torch.log(sigmoid(-margin))


LOSSES = {
    "sigmoid": DPOConfig(beta=0.5),
    "sigmoid_smoothed": DPOConfig(beta=0.5, label_smoothing=0.2),
    "ipo": DPOConfig(beta=0.5, loss_type="ipo"),
    "hinge": DPOConfig(beta=0.5, loss_type="hinge"),
    "orpo": ORPOConfig(odds_ratio_weight=0.5),
    "simpo": SimPOConfig(beta=2.0, gamma=0.5, label_smoothing=0.1),
}


@pytest.fixture(scope="module")
def pairs_and_models(tiny_llama_dir, data_dir, tmp_path_factory):
    pairs = real_pairs(tiny_llama_dir, data_dir, tmp_path_factory.mktemp("pairs"))
    return pairs, lora_model(tiny_llama_dir)


@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_metrics_and_gradients_equal_float64_formulas(name, pairs_and_models):
    pairs, model = pairs_and_models
    config = LOSSES[name]
    assert {len(p["chosen"]["input_ids"]) for p in pairs} != {len(p["rejected"]["input_ids"]) for p in pairs}

    objective = PreferenceObjective(config, pad_id=0, reference=base_model_reference)
    model.zero_grad()
    loss, metrics = objective.loss_sum(CausalLMObjective(model), objective.collate(pairs))
    loss.backward()
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    ours = {n: p.grad.clone() for n, p in trained.items()}

    # The same network in float64; its reference is a copy with every B = 0 (the base model).
    policy64 = copy.deepcopy(model).double()
    base64 = copy.deepcopy(policy64)
    for module in base64.modules():
        if isinstance(module, LoRALinear):
            torch.nn.init.zeros_(module.lora_B.weight)
    total = torch.zeros((), dtype=torch.float64)
    accuracy = 0.0
    for pair in pairs:
        w, l = pair["chosen"], pair["rejected"]
        policy_w, policy_l = float64_sequence_log_prob(policy64, w), float64_sequence_log_prob(policy64, l)
        with torch.no_grad():
            ref_w, ref_l = float64_sequence_log_prob(base64, w), float64_sequence_log_prob(base64, l)
        length_w, length_l = (w["targets"] != -100).sum(), (l["targets"] != -100).sum()
        total = total + paper_loss(name, config, policy_w, policy_l, ref_w, ref_l, length_w, length_l)
        if name == "orpo":
            accuracy += float(policy_w / length_w > policy_l / length_l)  # odds are increasing in P
        elif name == "simpo":
            accuracy += float(policy_w / length_w > policy_l / length_l)
        else:
            accuracy += float(policy_w - ref_w > policy_l - ref_l)
    total.backward()
    expected = {n: p.grad for n, p in policy64.named_parameters() if p.requires_grad}

    # float32 log-probs summed over ~250 tokens: about 1e-4 of absolute rounding in a log-ratio.
    torch.testing.assert_close(loss.double(), total.detach(), rtol=2e-4, atol=2e-4)
    assert metrics["rewards/accuracy"].item() == accuracy
    grad_scale = max(g.abs().max() for g in expected.values())
    assert grad_scale > 0
    for parameter_name, grad in ours.items():
        torch.testing.assert_close(grad.double(), expected[parameter_name], rtol=1e-3, atol=1e-4 * grad_scale)


def test_dpo_rewards_and_log_probs_match_their_definitions(pairs_and_models):
    pairs, model = pairs_and_models
    objective = PreferenceObjective(LOSSES["sigmoid"], pad_id=0, reference=base_model_reference)
    batch = objective.collate(pairs)
    wrapped = CausalLMObjective(model)
    with torch.no_grad():
        policy = sequence_log_probs(wrapped, batch)
        with adapters_disabled(wrapped):
            reference = sequence_log_probs(wrapped, batch)
        _, metrics = objective.loss_sum(wrapped, batch)
    chosen_rewards = 0.5 * (policy.chosen - reference.chosen)
    rejected_rewards = 0.5 * (policy.rejected - reference.rejected)
    torch.testing.assert_close(metrics["rewards/chosen"], chosen_rewards.sum())
    torch.testing.assert_close(metrics["rewards/rejected"], rejected_rewards.sum())
    torch.testing.assert_close(metrics["rewards/margin"], (chosen_rewards - rejected_rewards).sum())
    torch.testing.assert_close(metrics["logps/chosen"], policy.chosen.sum())
    torch.testing.assert_close(metrics["logps/rejected"], policy.rejected.sum())
    # Switching the adapters off changed the model, and switching them back on restored it.
    assert not torch.equal(policy.chosen, reference.chosen)
    with torch.no_grad():
        torch.testing.assert_close(sequence_log_probs(wrapped, batch).chosen, policy.chosen, rtol=0, atol=0)


@pytest.mark.parametrize("dora", [False, True])
def test_at_step_zero_the_policy_is_its_reference_and_dpo_starts_at_log_2(dora, tiny_llama_dir, pairs_and_models):
    pairs, _ = pairs_and_models
    model = lora_model(tiny_llama_dir, dora=dora, perturb=False)
    objective = PreferenceObjective(DPOConfig(), pad_id=0, reference=base_model_reference)
    batch = objective.collate(pairs)
    wrapped = CausalLMObjective(model)
    policy = sequence_log_probs(wrapped, batch)
    reference = base_model_reference(wrapped, batch)
    assert torch.equal(policy.chosen.detach(), reference.chosen)
    assert torch.equal(policy.rejected.detach(), reference.rejected)
    loss, metrics = objective.loss_sum(wrapped, batch)
    assert loss.item() / len(pairs) == pytest.approx(math.log(2), abs=1e-7)
    assert metrics["rewards/margin"].item() == 0.0


def test_full_fine_tuning_reference_is_a_frozen_copy(tiny_llama_dir, pairs_and_models):
    pairs, _ = pairs_and_models
    model = load_for_training("full", tiny_llama_dir, torch.float32, CPU, None, None)
    reference = FrozenReference(CausalLMObjective(copy.deepcopy(model)), autocast=contextlib.nullcontext)
    objective = PreferenceObjective(DPOConfig(), pad_id=0, reference=reference)
    wrapped = CausalLMObjective(model)
    batch = objective.collate(pairs)
    loss, _ = objective.loss_sum(wrapped, batch)
    assert loss.item() / len(pairs) == pytest.approx(math.log(2), abs=1e-7)
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    # The policy moved; the reference still computes the starting model.
    assert all(not p.requires_grad for p in reference.model.parameters())
    start = reference(wrapped, batch)
    assert not torch.equal(sequence_log_probs(wrapped, batch).chosen.detach(), start.chosen)
    fresh = load_for_training("full", tiny_llama_dir, torch.float32, CPU, None, None)
    assert torch.equal(sequence_log_probs(CausalLMObjective(fresh), batch).chosen.detach(), start.chosen)


# ----------------------------------------------------------------------------------------------------------------
# `litft finetune dpo | orpo | simpo` end to end on the pretrained stories260K
# ----------------------------------------------------------------------------------------------------------------

TRAIN_NAMES = ["Lily", "Tom", "Sue", "Ben", "Max", "Mia", "Sam", "Anna", "Tim", "Lucy", "Jack", "Kim"]
HELD_OUT_NAMES = ["Bob", "Amy", "Joe", "Zoe"]
KINDS = ["girl", "boy", "dog", "cat", "bird"]
PLACES = ["park", "house", "forest", "town"]


def story_pairs(names: list[str]) -> list[dict[str, str]]:
    """A story opening; the chosen ending is happy, the rejected one sad. The pretrained model itself would say
    the character was very "excited"."""
    pairs = []
    for index, (name, kind) in enumerate((name, kind) for name in names for kind in KINDS):
        prompt = f"Once upon a time, there was a little {kind} named {name}. {name} lived in a big {PLACES[index % 4]}."
        pairs.append({"prompt": prompt, "chosen": f"{name} was very happy.", "rejected": f"{name} was very sad."})
    return pairs


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def litft(*args: str) -> None:
    from litft.cli import main

    main([str(arg) for arg in args])


def story_run_args(stories_dir: Path, tmp_path: Path, out_dir: Path) -> list[str]:
    train = write_jsonl(tmp_path / "train.jsonl", story_pairs(TRAIN_NAMES))
    val = write_jsonl(tmp_path / "val.jsonl", story_pairs(HELD_OUT_NAMES))
    return [
        "--checkpoint", stories_dir, "--out_dir", out_dir, "--data.path", train, "--data.val_path", val,
        "--data.template", "plain", "--data.cache_dir", tmp_path / "cache", "--lora.targets", "[all-linear]",
        "--train.global_batch_size", "8", "--train.micro_batch_size", "4", "--train.lr", "1e-3",
        "--train.lr_scheduler", "constant", "--train.warmup_steps", "0", "--accelerator", "cpu",
    ]


def last_validation(out_dir: Path) -> dict[str, float]:
    with (out_dir / "metrics.csv").open(newline="") as file:
        rows = [row for row in csv.DictReader(file) if row.get("val/loss")]
    return {name.removeprefix("val/"): float(value) for name, value in rows[-1].items() if name.startswith("val/") and value}


def greedy_feelings(checkpoint: Path, names: list[str]) -> list[str]:
    """The word the model greedily puts after "<name> was very" once the story opening is given."""
    from litft.checkpoint import load_model
    from litft.tokenizer import Tokenizer

    model = load_model(checkpoint, dtype=torch.float32).eval()
    tokenizer = Tokenizer.from_checkpoint(checkpoint)
    words = []
    for pair in story_pairs(names):
        prefix = pair["chosen"].removesuffix(" happy.")
        ids = tokenizer.encode(f"{pair['prompt']}\n{prefix}")
        start = len(ids)
        with torch.no_grad():
            for _ in range(6):
                ids.append(int(model.logits(model.hidden_states(torch.tensor([ids])))[0, -1].argmax()))
        words.append(tokenizer.decode(ids[start:]).split()[0].strip(".,!"))
    return words


def happy_share(words: list[str]) -> float:
    return words.count("happy") / len(words)


@pytest.mark.parametrize("objective, flags", [
    ("dpo", ["--dpo.beta", "0.1"]),
    ("orpo", []),
    ("simpo", []),
])
def test_stories_learn_the_chosen_style(objective, flags, stories_dir, tmp_path):
    out_dir = tmp_path / "out"
    litft("finetune", objective, *story_run_args(stories_dir, tmp_path, out_dir), "--train.max_steps", "4", *flags)

    validation = last_validation(out_dir)
    assert validation["rewards/accuracy"] > 0.9
    assert validation["rewards/margin"] > 0
    for name in ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert math.isfinite(validation[name])
    assert (out_dir / "preference.png").stat().st_size > 0
    run = json.loads((out_dir / "final" / "litft_run.json").read_text())
    assert run["method"] == "lora" and run["extra"]["objective"] == objective

    if objective != "dpo":
        return
    # The adapter merges into a standalone model whose greedy generations took the chosen style.
    litft("merge", "--adapter", out_dir / "final", "--out_dir", tmp_path / "merged")
    assert happy_share(greedy_feelings(stories_dir, HELD_OUT_NAMES)) < 0.1
    assert happy_share(greedy_feelings(tmp_path / "merged", HELD_OUT_NAMES)) > 0.9


def test_full_fine_tuning_dpo_resumes_to_the_same_weights(stories_dir, tmp_path):
    """Two steps, then a resumed run to four, give exactly the weights of four steps in one go: the frozen
    reference is rebuilt from the checkpoint folder, not from the resumed policy."""
    from safetensors.torch import load_file

    def run(out_dir: Path, steps: int, *extra: str) -> None:
        litft("finetune", "dpo", *story_run_args(stories_dir, tmp_path, out_dir), "--method", "full",
              "--train.lr", "1e-4", "--train.max_steps", steps, "--logger", "none", *extra)

    run(tmp_path / "straight", 4)
    run(tmp_path / "resumed", 2)
    run(tmp_path / "resumed", 4, "--resume", "auto")
    straight = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "final" / "model.safetensors")
    base = load_file(stories_dir / "model.safetensors")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    assert any(not torch.equal(straight[name], base[name]) for name in base)


def preference_records(**changes) -> list[dict]:
    records = [
        {"prompt": "Tell me a story.", "chosen": "Lily was very happy.", "rejected": "Lily was very sad."},
        {"prompt": "Tell me another story.", "chosen": "Tom was very happy.", "rejected": "Tom was very sad."},
    ]
    records[1].update(changes)
    return [{k: v for k, v in record.items() if v is not None} for record in records]


@pytest.mark.parametrize("records, flags, message", [
    (preference_records(chosen=None), [], "line 2: missing field `chosen`"),
    (preference_records(rejected="Tom was very happy."), [], "line 2: `chosen` and `rejected` are identical"),
    (preference_records(prompt="Tell me a story. " * 20), ["--data.max_seq_length", "32"],
     "line 2: the prompt is"),
    (preference_records(), ["--dpo.loss_type", "kto"], "--dpo.loss_type 'kto': choose one of sigmoid, ipo, hinge"),
    (preference_records(), ["--dpo.loss_type", "ipo", "--dpo.label_smoothing", "0.1"], "--dpo.label_smoothing"),
    (preference_records(), ["--dpo.beta", "0"], "--dpo.beta 0.0: must be positive"),
    (preference_records(), ["--method", "adapter"], "--method 'adapter': choose one of lora, qlora, full"),
    (preference_records(), ["--data.pack", "true"], "--data.pack"),
    (preference_records(), ["--train.router_aux_loss_coef", "0.01"],
     "--train.router_aux_loss_coef applies to supervised fine-tuning, not to dpo"),
])
def test_bad_pairs_and_flags_fail_with_one_line(records, flags, message, stories_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", records)
    with pytest.raises(SystemExit) as exit_info:
        litft("finetune", "dpo", "--checkpoint", stories_dir, "--out_dir", tmp_path / "out", "--data.path", data,
              "--data.template", "plain", "--data.cache_dir", tmp_path / "cache", "--accelerator", "cpu", *flags)
    assert exit_info.value.code == 2
    error_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("litft: error:")]
    assert len(error_lines) == 1 and message in error_lines[0], error_lines
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("objective, flags", [
    ("orpo", ["--orpo.odds_ratio_weight", "-1"]),
    ("simpo", ["--simpo.gamma", "-0.5"]),
    ("simpo", ["--simpo.label_smoothing", "0.5"]),
])
def test_bad_reference_free_settings_fail_with_one_line(objective, flags, stories_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        litft("finetune", objective, "--checkpoint", stories_dir, "--data.path", tmp_path / "pairs.jsonl", *flags)
    assert exit_info.value.code == 2
    assert f"litft: error: {flags[0]}" in capsys.readouterr().err


RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*/dpo.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.parent.name)
def test_dpo_recipes_parse(recipe, capsys):
    with pytest.raises(SystemExit) as exit_info:
        litft("finetune", "dpo", "--config", recipe, "--print_config")
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "beta: 0.1" in printed and "method:" in printed


def test_help_documents_the_preference_flags(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # argparse wraps descriptions at the terminal width
    for objective, flag in (("dpo", "--dpo.loss_type"), ("orpo", "--orpo.odds_ratio_weight"), ("simpo", "--simpo.gamma")):
        with pytest.raises(SystemExit):
            litft("finetune", objective, "--help")
        printed = capsys.readouterr().out
        assert flag in printed and "Where checkpoints, metrics and the final adapter or model go." in printed
