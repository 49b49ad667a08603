"""Receiving: the Storage SCP, the streamed intake and the checks on what arrives."""
