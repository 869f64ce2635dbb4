"""DAPO's soft overlong punishment: the one place its formula lives (the engine imports it too)."""


def overlong_penalty(length: int, max_length: int, buffer: int, factor: float = 1.0) -> float:
    """Penalty for a response of `length` tokens, with L_max = `max_length` and L_c = `buffer`:
    0 if length <= L_max - L_c; ((L_max - L_c) - length) / L_c * factor inside the buffer (falling
    linearly to -factor at L_max); -factor beyond L_max."""
    if buffer <= 0 or buffer > max_length:
        raise ValueError(f"overlong_penalty: buffer must be in (0, max_length={max_length}], got {buffer}")
    if length < 0:
        raise ValueError(f"overlong_penalty: length must be >= 0, got {length}")
    expected = max_length - buffer
    if length <= expected:
        return 0.0
    if length <= max_length:
        return (expected - length) / buffer * factor
    return -factor
