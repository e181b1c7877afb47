"""Programs on top of the library and the engine: CLI, sweep summary, chat, control-vector tool."""
