"""Pure scoring functions (no lm-eval, no click), shared by the tasks, the CLI and the tests."""
