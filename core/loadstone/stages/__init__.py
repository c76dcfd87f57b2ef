"""The pipeline's stages, one module each, in the order they run (``loadstone.STAGES``):

1. :mod:`.resolve`: the reference becomes a base model folder and adapter folders (resolvers).
2. :mod:`.inspect`: safetensors headers, shard index and ``config.json``, validated; no weights.
3. :mod:`.plan`: task, dtype, quantization, placement, the tensor map and the engine.
4. :mod:`.load_weights`: the engine fills the model; the kernel checks it against the plan.
5. :mod:`.prepare`: freezing, the backend's training preparation, gradient checkpointing.
6. :mod:`.adapters`: peft adapters attached (and checked against the skeleton during the plan).
7. :mod:`.report`: parameter counts; the report's other sections fill in as the stages run.

:mod:`loadstone.pipeline` runs them; ``loadstone.plan`` stops after stage 3.
"""
