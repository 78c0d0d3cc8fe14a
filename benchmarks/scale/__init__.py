"""Memory and time at the mission's shapes: random-weight 7B/13B-shaped checkpoints, stage by stage."""
