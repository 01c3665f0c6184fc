"""Explanations of a trained network's decisions: class activation maps, Grad-CAM, boxes."""
