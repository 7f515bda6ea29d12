"""Stage entry points: each takes the validated config and reads/writes the run directory."""
