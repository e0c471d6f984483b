"""Developer tools run from the repository root (not installed): ``python -m scripts.topology`` and the PEFT
reference runner ``scripts/peft_reference.py`` (run by the reference environment's python, by path)."""
