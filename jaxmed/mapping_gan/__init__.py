"""The mapping-GAN system (docs/mapping_gan.md): `config` (options and `config.json`), `data`
(the study and the step batches), `steps` (state, training and validation steps), `inference`
(the `apply` command), `figures`."""
