"""The quantization component type: :class:`QuantizationBackend`, and what it is told about a load
(:class:`QuantizationContext`).

A backend takes part in three phases. It plans (options, dtype, bytes per tensor, placement
rules), it loads (natively, by swapping its modules into the meta skeleton and converting each
checkpoint tensor on its device; or through transformers, by handing over a quantization
config), and it prepares the loaded model for training.

Importing this module must stay cheap: no torch, no transformers. Components import their heavy
dependencies inside methods, so that ``loadstone plugins`` can list them without paying for it.
"""

from __future__ import annotations

from abc import ABC
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .request import LoadRequest

__all__ = ["QuantizationBackend", "QuantizationContext", "requirement_problems", "set_module_tensor"]


def requirement_problems(requirements: tuple[str, ...] | list[str]) -> list[str]:
    """Check PEP 508 requirement strings against installed distributions without importing them.

    Returns one human-readable line per unmet requirement (empty list: all satisfied).
    Reads only distribution metadata, so it is cheap enough to run while listing plugins.
    """
    if not requirements:  # every load asks this of its backend: no import of packaging for nothing
        return []
    import importlib.metadata  # here: 20-60 ms on its own, and `import loadstone` needs none of it

    from packaging.requirements import Requirement

    problems = []
    for text in requirements:
        req = Requirement(text)
        try:
            installed = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"{req.name} is not installed (pip install '{text}')")
            continue
        if req.specifier and not req.specifier.contains(installed, prereleases=True):
            problems.append(f"{req.name} {installed} is installed but {text} is needed (pip install -U '{text}')")
    return problems


def set_module_tensor(module: Any, name: str, tensor: Any) -> None:
    """Make ``tensor`` the parameter or buffer ``name`` of ``module`` (a direct child name such as
    ``"weight"``), as a load does: a parameter stays a parameter (trainable if it is floating
    point; the kernel freezes the base later), a buffer stays a buffer. Raises ``KeyError`` for a
    name the module has neither as parameter nor as buffer."""
    import torch

    if name in module._parameters:
        param = tensor if isinstance(tensor, torch.nn.Parameter) else torch.nn.Parameter(
            tensor, requires_grad=tensor.is_floating_point())
        param._is_hf_initialized = True  # transformers' marker: never re-initialise a loaded tensor
        module._parameters[name] = param
    elif name in module._buffers:
        module._buffers[name] = tensor
    else:
        raise KeyError(f"{type(module).__name__} has no parameter or buffer {name!r}")


# --------------------------------------------------------------------------- quantization


@dataclass
class QuantizationContext:
    """What a quantization backend knows about the load it takes part in.

    ``method`` is the method the user asked for (``"nf4"``), or the checkpoint's own
    ``quant_method`` when a pre-quantized checkpoint is loaded as it is. ``options`` are the
    user's options after :meth:`QuantizationBackend.normalize_options`. ``checkpoint_config`` is
    the checkpoint's ``quantization_config`` dict when it is pre-quantized, else ``None``.
    ``device_map`` is ``None`` while sizes are estimated and placement is checked; the kernel sets
    it to the final device map before transient bytes are asked again for the plan's peak and
    before the engine is chosen, so a backend can count device-specific work space and configure
    offloading for the layout actually used. ``loading`` is ``False`` when
    the kernel only plans (``loadstone.plan``): skip work only a real load needs, such as
    importing the quantization library to probe the device.
    """

    method: str
    options: dict[str, Any]
    checkpoint_config: dict[str, Any] | None
    model_config: Any
    dtype: "torch.dtype | None" = None
    request: "LoadRequest | None" = None
    device_map: dict[str, Any] | None = None
    loading: bool = True
    #: scratch space for the backend during one load (the kernel empties it before the engine
    #: runs): components are shared by concurrent loads, so per-load state lives here.
    state: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def pre_quantized(self) -> bool:
        return self.checkpoint_config is not None


class QuantizationBackend(ABC):
    """A quantization method (or family of methods) loadstone can load a model with.

    Subclass it, set the class attributes, override what your method needs, and register an
    instance from your plugin's ``loadstone_register_quantization_backends(register)`` hook. Every
    method has a default, so the smallest backend names itself and its methods and converts
    tensors in :meth:`load_tensor`.

    Class attributes:
        name: the component's unique name (usually the library, e.g. ``"bitsandbytes"``).
        methods: method names users ask for (``quantization="nf4"``); unique across plugins.
        checkpoint_formats: ``quantization_config.quant_method`` values of pre-quantized
            checkpoints this backend loads as they are.
        requirements: PEP 508 strings checked with distribution metadata (no import) by
            :meth:`environment_problems`.
        description: one line shown by ``loadstone plugins``.
    """

    name: ClassVar[str]
    methods: ClassVar[tuple[str, ...]] = ()
    checkpoint_formats: ClassVar[tuple[str, ...]] = ()
    requirements: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""

    # -- discovery ---------------------------------------------------------------
    def environment_problems(self) -> list[str]:
        """Why this backend cannot run here (missing or too old dependencies); empty if it can.

        Must not import heavy modules: it runs while plugins are listed.
        """
        return requirement_problems(self.requirements)

    def claims_checkpoint(self, quantization_config: Mapping[str, Any]) -> bool:
        """Whether this backend loads a checkpoint whose config has this ``quantization_config``."""
        return str(quantization_config.get("quant_method", "")).lower() in self.checkpoint_formats

    def checkpoint_method(self, quantization_config: Mapping[str, Any]) -> str:
        """The method name (one of ``methods``, or the format itself) that describes a
        pre-quantized checkpoint this backend claimed; asking for any other method on it is an error."""
        return str(quantization_config.get("quant_method", "")).lower()

    def read_checkpoint_config(self, folder: Any, config: Mapping[str, Any]) -> dict[str, Any] | None:
        """A ``quantization_config`` for a checkpoint whose ``config.json`` has none, read from a file
        of this backend's own format (legacy GPTQ checkpoints carry only ``quantize_config.json``),
        or ``None``. Asked only when ``config.json`` declares no quantization; a returned dict is
        then treated exactly as if ``config.json`` held it (it must be one this backend claims).
        ``folder`` is the checkpoint folder (a ``pathlib.Path``), ``config`` the raw ``config.json``."""
        return None

    # -- options -----------------------------------------------------------------
    def option_help(self) -> dict[str, str]:
        """Option name -> one-line help, shown by ``loadstone plugins`` and ``--help``."""
        return {}

    def normalize_options(self, method: str, options: Mapping[str, Any],
                          ctx: QuantizationContext | None = None) -> dict[str, Any]:
        """Validate and fill defaults for the user's options; raise :class:`~loadstone.OptionError`.

        ``ctx`` is this load's context (``ctx.options`` still empty): the checkpoint's own
        quantization config and the model config are known by then. (Contract 1 called this
        without ``ctx``; implementations that do not take it still work, with a
        ``DeprecationWarning``.)
        """
        unknown = set(options) - set(self.option_help())
        if unknown:
            from .errors import OptionError

            raise OptionError(
                f"quantization method {method!r} ({self.name}) does not take the option(s) "
                f"{', '.join(sorted(unknown))}.",
                field="quantization options",
                expected=", ".join(sorted(self.option_help())) or "no options",
                found=", ".join(sorted(unknown)),
                fix="remove them or check `loadstone plugins` for the backend's options",
            )
        return dict(options)

    # -- planning ----------------------------------------------------------------
    def adjust_dtype(self, dtype: "torch.dtype", ctx: QuantizationContext) -> "torch.dtype":
        """The dtype non-quantized parameters are loaded in; default: unchanged."""
        return dtype

    def converts_tensor(self, module_name: str, param_name: str, module: Any, ctx: QuantizationContext) -> bool:
        """Whether this backend turns the tensor ``module_name.param_name`` into something else as it
        loads it (quantizes it, or unpacks a pre-quantized form). Asked at plan time, on the
        skeleton before :meth:`convert_skeleton`. Converted tensors reach :meth:`load_tensor` in
        the load dtype, their loaded dtype and shape are the backend's to decide (the kernel checks
        neither), and the estimate counts one full-precision copy of each in flight. A pre-quantized
        checkpoint may store a converted tensor only as pieces under other names (GPTQ keeps a
        layer's ``weight`` as ``qweight``, ``qzeros``, ``scales``, ``g_idx``): it is then not missing
        if :meth:`accepts_tensor` takes pieces for its module, and never reaches :meth:`load_tensor`
        under its own name. Default: ``False`` (nothing is converted)."""
        return False

    def parameter_bytes(self, module_name: str, param_name: str, tensor: "torch.Tensor",
                        module: Any, ctx: QuantizationContext) -> float:
        """Bytes one parameter or buffer will occupy after loading (the memory estimate at rest).

        ``tensor`` lives on the meta device in the dtype chosen for the load. The default counts
        it unquantized.
        """
        return tensor.numel() * tensor.element_size()

    def transient_bytes(self, module_name: str, param_name: str, tensor: "torch.Tensor",
                        module: Any, ctx: QuantizationContext) -> float:
        """Extra bytes on the tensor's device while it is being loaded, on top of what the model
        holds at rest: the plan's peak per device is its resting bytes plus the largest of these.
        Count everything in flight at once: the full-precision tensor and the work tensors your
        conversion allocates. Asked twice: before placement (``ctx.device_map`` is ``None``; the
        placement strategy sees these) and once the device map is chosen (``ctx.device_map`` set;
        the plan's peak uses these), so work space that differs per device can be counted where
        it is spent. Default: the full-precision tensor for a converted one
        (:meth:`converts_tensor`), else 0."""
        if self.converts_tensor(module_name, param_name, module, ctx):
            return tensor.numel() * tensor.element_size()
        return 0.0

    def check_placement(self, device_map: dict[str, Any], ctx: QuantizationContext) -> dict[str, Any]:
        """Validate (or adjust) the device map a placement strategy chose; raise
        :class:`~loadstone.PlacementError` for layouts this method cannot run on."""
        return device_map

    def describe(self, ctx: QuantizationContext) -> dict[str, Any]:
        """Details recorded in the load report's quantization section."""
        return {"method": ctx.method, "options": dict(ctx.options), "pre_quantized": ctx.pre_quantized}

    # -- loading: which engine ----------------------------------------------------
    def native_problems(self, ctx: QuantizationContext) -> list[str]:
        """Why loadstone's native engine cannot load with this backend; empty if it can.

        Default: a backend that converts tensors itself (overrides :meth:`load_tensor` or
        :meth:`convert_skeleton`) can; one that only offers :meth:`transformers_config` cannot
        (it runs on the transformers engine), unless that config is ``None``.
        """
        own = type(self)
        if own.load_tensor is not QuantizationBackend.load_tensor or \
                own.convert_skeleton is not QuantizationBackend.convert_skeleton:
            return []
        if self.transformers_config(ctx) is None:
            return []
        return [f"quantization backend {self.name!r} converts weights only through transformers "
                f"(it offers transformers_config, not load_tensor)"]

    def transformers_config(self, ctx: QuantizationContext) -> Any:
        """The ``quantization_config`` object handed to ``from_pretrained`` by the transformers
        engine, or ``None`` (default: no quantization config)."""
        return None

    # -- loading: the native engine ------------------------------------------------
    def convert_skeleton(self, model: Any, ctx: QuantizationContext) -> None:
        """Swap this backend's module types into the skeleton before any weight is read.

        ``model`` is the model on the meta device, in the load dtype; replace the modules you
        quantize with your own (still on meta), keeping their names. Default: nothing.
        """

    def accepts_tensor(self, module_name: str, name: str, module: Any, ctx: QuantizationContext) -> bool:
        """Whether :meth:`load_tensor` takes a checkpoint tensor the skeleton has no parameter or
        buffer for, such as a pre-quantized checkpoint's quantization state (``weight.absmax``,
        ``qzeros``). ``module`` is the owning module of the skeleton before
        :meth:`convert_skeleton`; ``name`` is the rest of the key (``"weight.absmax"``). Asked at
        plan time; an unaccepted tensor is an unexpected tensor (an error). Default: ``False``."""
        return False

    def load_tensor(self, module_name: str, module: Any, name: str, tensor: "torch.Tensor",
                    ctx: QuantizationContext) -> None:
        """Turn one checkpoint tensor into ``module``'s parameters and buffers.

        ``module`` is the (converted) module named ``module_name``; ``name`` the tensor's name
        inside it (``"weight"``, ``"bias"``, or an accepted extra such as ``"weight.absmax"``).
        ``tensor`` is already read and on its planned device, in its planned dtype (the load
        dtype for converted tensors). Quantize it there, tensor by tensor. Pieces that only make
        sense together (a pre-quantized weight and its state) may be kept in ``ctx.state`` until
        the last arrives. Default: :func:`set_module_tensor` (the tensor as it is).
        """
        set_module_tensor(module, name, tensor)

    def finish_model(self, model: Any, ctx: QuantizationContext) -> list[str]:
        """Finish the loaded model before anything else sees it (every engine calls it once, right
        after the last weight is in place, for trainable and frozen loads alike).

        The place to set per-module runtime flags, or to convert what needs the whole model.
        Returns short notes for the load report. The default does nothing.
        """
        return []

    # -- training ------------------------------------------------------------------
    def prepare_for_training(self, model: Any, ctx: QuantizationContext) -> list[str]:
        """Prepare the already frozen base model for adapter training (e.g. cast non-quantized
        half-precision parameters to float32). Gradient checkpointing is not yours: the kernel
        enables it afterwards, the same way for every backend.

        Returns short notes for the load report (what was done). The default does nothing.
        """
        return []
