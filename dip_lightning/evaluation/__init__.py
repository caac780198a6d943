"""The evaluation layer: sample export in the ADM evaluator's format, sweeps over EMA and guidance, reports that
put runs side by side. Builds on training, checkpoint and core."""
