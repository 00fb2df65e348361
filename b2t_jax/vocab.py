"""The output vocabulary (SPEC §2): what each logit index means, shared by the losses, metrics, decoders and data."""

# Logit index -> phoneme (SPEC §2). Index 0 is the CTC blank, 40 the word boundary.
PHONEMES = ("BLANK", "AA", "AE", "AH", "AO", "AW", "AY", "B", "CH", "D", "DH", "EH", "ER", "EY", "F", "G", "HH",
            "IH", "IY", "JH", "K", "L", "M", "N", "NG", "OW", "OY", "P", "R", "S", "SH", "T", "TH", "UH", "UW",
            "V", "W", "Y", "Z", "ZH", " | ")
BLANK_ID = 0                 # the CTC blank
SIL_ID = len(PHONEMES) - 1   # the word boundary " | "
