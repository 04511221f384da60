"""StreamChat's desktop window (PySide6). It talks only to the ``appliance`` API; the model runs in a worker thread."""
