"""An adapter loadstone loaded, trained and saved with peft's ``save_pretrained`` reloads from
wherever it was saved, with loadstone and with plain peft: the saved config names the base this
load used (an absolute folder, or a Hub id at the commit), not the relative path it was found by."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import loadstone
from loadstone.testing import make_checkpoint, make_hub_cache, make_lora_adapter

COMMIT = "00112233445566778899aabbccddeeff00112233"


def train_one_step(model) -> dict:
    """One SGD step on random tokens; returns the adapter's weights after it."""
    import torch

    torch.manual_seed(3)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    after = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert before and any(not torch.equal(before[n], after[n]) for n in after)  # the step changed the adapter
    return after


def adapter_weights(model) -> dict:
    return {n: p.detach() for n, p in model.named_parameters() if "lora_" in n}


def assert_same(ours: dict, theirs: dict) -> None:
    import torch

    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[n], theirs[n]) for n in ours)


@pytest.fixture(scope="module")
def relative(tmp_path_factory) -> tuple[Path, Path]:
    """``work/base`` and ``work/adapter``, the adapter naming its base ``../base``."""
    work = tmp_path_factory.mktemp("work")
    base = make_checkpoint("llama", work / "base")
    return base, make_lora_adapter(base, work / "adapter", base_reference="../base")


def test_a_trained_adapter_with_a_relative_base_reloads_after_saving_elsewhere(relative, tmp_path, monkeypatch):
    from peft import AutoPeftModelForCausalLM

    base, adapter = relative
    result = loadstone.load(str(adapter), placement="cpu", progress=False)
    where = str(base.resolve())
    assert result.report.adapters[0]["base_model_name_or_path"] == where
    assert result.report.adapters[0]["revision"] is None
    (note,) = [n for n in result.report.notes if "base_model_name_or_path" in n]
    assert f"set to {where!r}" in note and "'../base'" in note and "save_pretrained" in note
    trained = train_one_step(result.model)

    saved = tmp_path / "runs" / "exp-1" / "checkpoint-1"  # another depth: '../base' names nothing here
    result.model.save_pretrained(str(saved))
    config = json.loads((saved / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["revision"]) == (where, None)
    monkeypatch.chdir(tmp_path)  # neither reload may depend on where the process runs

    again = loadstone.load(str(saved), placement="cpu", progress=False)
    assert again.report.sources["base"]["path"] == where
    assert_same(adapter_weights(again.model), trained)
    assert not any("base_model_name_or_path" in n for n in again.report.notes)  # nothing left to fix

    plain = AutoPeftModelForCausalLM.from_pretrained(str(saved))
    assert_same(adapter_weights(plain), trained)


PEFT_RELOAD = """
import json
import torch
from peft import AutoPeftModelForCausalLM
model = AutoPeftModelForCausalLM.from_pretrained({saved!r})
torch.save({{n: p.detach() for n, p in model.named_parameters() if "lora_" in n}}, {out!r})
print(json.dumps(model.peft_config["default"].base_model_name_or_path))
"""


@pytest.mark.slow
def test_a_hub_base_is_recorded_with_its_commit(sharded_llama, tmp_path, python_subprocess):
    import torch

    cache = tmp_path / "hub"
    make_hub_cache(cache, "org/tiny", sharded_llama, commit=COMMIT)
    adapter = make_lora_adapter(sharded_llama, tmp_path / "adapter", base_reference="org/tiny")
    result = loadstone.load(str(adapter), placement="cpu", cache_dir=str(cache), offline=True, progress=False)
    summary = result.report.adapters[0]
    assert (summary["base_model_name_or_path"], summary["revision"]) == ("org/tiny", COMMIT)
    trained = train_one_step(result.model)
    saved = tmp_path / "elsewhere" / "adapter"
    result.model.save_pretrained(str(saved))
    config = json.loads((saved / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["revision"]) == ("org/tiny", COMMIT)

    again = loadstone.load(str(saved), placement="cpu", cache_dir=str(cache), offline=True, progress=False)
    assert again.report.sources["base"]["commit"] == COMMIT
    assert_same(adapter_weights(again.model), trained)
    # plain peft finds the base the way huggingface_hub does: the cache, at the recorded commit
    code = PEFT_RELOAD.format(saved=str(saved), out=str(tmp_path / "weights.pt"))
    done = python_subprocess(code, env={"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same(torch.load(tmp_path / "weights.pt"), trained)
