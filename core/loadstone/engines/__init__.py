"""The built-in engines: :mod:`.native` (``loadstone``) and :mod:`.transformers`."""
