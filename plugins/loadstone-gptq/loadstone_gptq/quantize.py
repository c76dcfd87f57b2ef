"""Quantizing a model to GPTQ ahead of time, with gptqmodel, from the user's calibration data.

GPTQ is not applied while loading: it runs the model over calibration samples and solves for each
layer's weights in turn (seconds for a tiny model on a CPU, minutes per billion parameters on a
GPU). :func:`quantize` does it once and writes a checkpoint (``config.json`` with a
``quantization_config``, ``quantize_config.json``, safetensors) that ``loadstone.load`` then loads
like any GPTQ checkpoint. The command line is ``loadstone-gptq quantize``.
"""

from __future__ import annotations

import contextlib
import io
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from loadstone import ConfigError, OptionError, QuantizationError

from .kernels import import_gptqmodel
from .settings import SUPPORTED_BITS, SUPPORTED_FORMATS

# Files a tokenizer saved with save_pretrained leaves; gptqmodel loads one from the model folder.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")

Progress = Callable[[int, int], None]


def _option(name: str, value: Any, expected: str) -> OptionError:
    return OptionError(f"quantize option {name}={value!r} is not valid.", field=name, expected=expected,
                       found=repr(value), fix=f"pass {name}= {expected}")


def _check_arguments(bits: int, group_size: int, checkpoint_format: str, calibration: Sequence[Any],
                     batch_size: int) -> None:
    if bits not in SUPPORTED_BITS or isinstance(bits, bool):
        raise _option("bits", bits, " or ".join(map(str, SUPPORTED_BITS)))
    if not isinstance(group_size, int) or isinstance(group_size, bool) or not (group_size == -1 or group_size > 0):
        raise _option("group_size", group_size, "a positive integer such as 128, or -1 (one group per column)")
    if checkpoint_format not in SUPPORTED_FORMATS:
        raise _option("checkpoint_format", checkpoint_format, " or ".join(SUPPORTED_FORMATS))
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise _option("batch_size", batch_size, "an integer >= 1")
    if isinstance(calibration, (str, bytes)) or not calibration:
        raise _option("calibration", calibration if isinstance(calibration, str) else "empty",
                      "a non-empty list of texts, of token-id lists, or of {'input_ids': [...]} records")


def _check_folder(folder: Path) -> None:
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{folder} is not a model folder (it has no config.json).", file=folder / "config.json",
                          field="model", expected="a folder written by save_pretrained", found="no config.json",
                          fix="pass the folder holding config.json and the safetensors weights")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise QuantizationError(
            f"{folder} has no tokenizer, and gptqmodel loads the model together with its tokenizer.",
            file=folder, field="tokenizer", expected=" or ".join(TOKENIZER_FILES), found="none",
            fix="save the model's tokenizer into the folder (tokenizer.save_pretrained(folder)); for a tiny test "
                "model, loadstone_gptq.testing.save_word_tokenizer(folder, texts) writes one")


def _samples(calibration: Sequence[Any]) -> list[Any]:
    """Texts as they are; token ids as the ``{"input_ids", "attention_mask"}`` records gptqmodel takes."""
    out = []
    for item in calibration:
        if isinstance(item, Mapping):
            ids = list(item["input_ids"])
            out.append({"input_ids": ids, "attention_mask": list(item.get("attention_mask") or [1] * len(ids))})
        elif isinstance(item, str):
            out.append(item)
        else:
            ids = [int(i) for i in item]
            out.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
    return out


def quantize(model: str | Path, output: str | Path, calibration: Sequence[Any], *, bits: int = 4,
             group_size: int = 128, desc_act: bool = False, sym: bool = True, checkpoint_format: str = "gptq",
             damp_percent: float | None = None, batch_size: int = 1, device: str = "cpu",
             progress: bool | Progress = True) -> Path:
    """Quantize the model in folder ``model`` to GPTQ with gptqmodel and save it to ``output``.

    :param calibration: samples the model is run over: texts (tokenized with the folder's
        tokenizer), token-id lists, or ``{"input_ids": [...]}`` records. A few hundred samples of
        the kind of text the model will see is usual; a handful is enough for a test.
    :param bits: 2, 3, 4 or 8 bits per weight.
    :param group_size: inputs sharing one scale and zero point (-1: one group per column).
    :param desc_act: act-order: quantize columns by decreasing activation (better accuracy).
    :param sym: symmetric quantization (one fixed zero point); ``False`` stores a zero point per group.
    :param checkpoint_format: ``"gptq"`` (v1 zero points, readable by every GPTQ loader) or ``"gptq_v2"``.
    :param damp_percent: Hessian dampening (default: gptqmodel's).
    :param device: where gptqmodel runs the calibration (``"cpu"``, ``"cuda:0"``).
    :param progress: ``True`` shows a bar per decoder layer, ``False`` nothing; a callable gets
        ``(layers done, layers in all)`` after each layer.
    :return: the output folder, loadable with ``loadstone.load(output)``.
    :raises loadstone.LoadstoneError: bad arguments, a folder without config or tokenizer, or a
        failure inside gptqmodel (its message included).
    """
    source, target = Path(model), Path(output)
    _check_arguments(bits, group_size, checkpoint_format, calibration, batch_size)
    _check_folder(source)
    import_gptqmodel()
    from gptqmodel import GPTQModel, QuantizeConfig

    settings: dict[str, Any] = dict(bits=bits, group_size=group_size, desc_act=desc_act, sym=sym,
                                    format=checkpoint_format)
    if damp_percent is not None:
        settings["damp_percent"] = damp_percent
    if desc_act or group_size == -1:
        # Group-aware reordering needs groups and no act-order: gptqmodel turns it off for act-order
        # with a warning, and refuses it for group_size -1.
        settings["act_group_aware"] = False
    started = time.monotonic()
    # gptqmodel prints its progress, tables and saved configs to stdout; a quiet call keeps them
    # (for the error message), a visible one shows them on stderr, stdout stays the caller's.
    console = io.StringIO() if progress is False else sys.stderr
    try:
        with contextlib.redirect_stdout(console):
            wrapper = GPTQModel.load(str(source), QuantizeConfig(**settings), device=device)
            total = int(getattr(wrapper.model.config.get_text_config(), "num_hidden_layers", 0) or 0)
            with LayerProgress(progress, total) as layer_done, logs_in(target / "logs"):
                wrapper.layer_callback = layer_done
                wrapper.quantize(_samples(calibration), batch_size=batch_size)
            wrapper.save(str(target))
    except (ValueError, RuntimeError, TypeError, KeyError, OSError) as exc:
        raise QuantizationError(f"gptqmodel could not quantize {source}: {type(exc).__name__}: {exc}",
                                file=source, field="quantize", found=type(exc).__name__,
                                fix="check the calibration samples (long enough: at least 10 tokens each) and the "
                                    "options; the message above is gptqmodel's") from exc
    _report(progress, f"quantized {source} to {target} in {time.monotonic() - started:.1f} s")
    return target


@contextlib.contextmanager
def logs_in(folder: Path) -> Iterator[None]:
    """gptqmodel 7.6 writes a log file per quantization step into ``./logs`` of the current
    directory; the output folder is where a user looks for them (next to gptqmodel's
    quant_log.csv). Its module-level setting is swapped for the duration, so one quantization at a
    time per process."""
    from gptqmodel.looper import loop_processor

    saved = getattr(loop_processor, "_PROJECT_LOG_DIR", None)
    if saved is None:  # another gptqmodel release: leave its logging as it is
        yield
        return
    loop_processor._PROJECT_LOG_DIR = folder
    try:
        yield
    finally:
        loop_processor._PROJECT_LOG_DIR = saved


class LayerProgress:
    """gptqmodel's per-layer callback (``layer_callback``), shown as a bar or passed to the user's callable."""

    def __init__(self, progress: bool | Progress, total: int):
        self.progress, self.total, self.done, self.bar = progress, total, 0, None

    def __enter__(self) -> "LayerProgress":
        if self.progress is True:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total or None, desc="GPTQ layers", unit="layer", leave=False)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.close()

    def __call__(self, layer_idx: int, submodule_finalized: bool) -> None:
        if not submodule_finalized:  # gptqmodel calls once when a layer's forward is done, once when it is saved
            return
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        elif callable(self.progress):
            self.progress(self.done, self.total)


def _report(progress: bool | Progress, message: str) -> None:
    if progress is True:
        print(message, file=sys.stderr)
