"""unit_model: the UNIT generator and discriminators, the HU transform, checkpoints, inference.

Imports torch and numpy only, never pydicom, pynetdicom or SQLAlchemy.
"""
