"""Photos and inpainting masks: bundled sets, folders, manifests, the seeded split."""
