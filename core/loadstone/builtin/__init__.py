"""Built-in plugins, registered through the same entry-point path as third-party ones."""
