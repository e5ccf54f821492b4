"""The time grid every trajectory lives on: 10 Hz, 16 history poses, 64 future waypoints.

The data, the action space, the policy and the evaluation all read these, so they have a
home of their own that imports nothing.
"""

DT = 0.1
"""Seconds between waypoints (10 Hz)."""
NUM_STEPS = 64
"""Future waypoints and action steps (6.4 s)."""
HISTORY_STEPS = 16
"""Ego history poses, 10 Hz, the last one the origin."""
HORIZON_S = NUM_STEPS * DT
"""Seconds covered by the future waypoints (6.4 s)."""
