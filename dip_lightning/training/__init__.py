"""The training layer: the LightningModule, the CLI class, the callbacks, and loading a trained DiP. Builds on the
checkpoint layer and the core."""
