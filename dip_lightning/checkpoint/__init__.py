"""The checkpoint layer: what a checkpoint holds and which of its weights a command uses (``format``), reading and
writing files (``io``), pretrained folders in the Hub's layout (``pretrained``), post-hoc EMA snapshots
(``posthoc``), where a run continues from (``resume``), whether a checkpoint fits a model (``compatibility``) and
the layout of a run folder (``run_folder``). Builds on the core only."""
