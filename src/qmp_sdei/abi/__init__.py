"""Data only: SMCCC, SDEI and PSCI constants, function ids and encodings.

Nothing here has behaviour beyond encoding helpers; every other layer imports from it.
"""
