"""Test helpers for hcms_compile: reference Ulysses layouts and the like."""
