"""Exporting a run: the model folder to deploy (`folder`), its model card (`card`), and
`mode export` (`command`), which the end of `mode train` runs into the run's `merged/`."""
