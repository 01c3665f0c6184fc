"""The feature atlas (docs/atlas.md): what a classifier's feature nodes respond to, as libraries
of real crops and generators of new ones."""
