"""The guards: one concern a module; none imports another. `Cache` composes them."""
