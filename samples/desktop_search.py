"""A desktop app's use of a bundle: semantic search with only numpy + onnxruntime (+ tokenizers).

    bash scripts/quickstart.sh                      # writes out/all-MiniLM-L6-v2-mobile
    python samples/desktop_search.py out/all-MiniLM-L6-v2-mobile "how do I reset my password"

No torch is imported: this is what an application embeds.
"""

from __future__ import annotations

import sys

import numpy as np

from lrt_deploy.runtime import Session, TextEncoder

DOCUMENTS = [
    "To change your password, open Settings, choose Account and tap Reset password.",
    "The train to the airport leaves every twenty minutes from platform four.",
    "Preheat the oven to 200 degrees before putting the bread in.",
    "Our support team answers emails within one business day.",
    "Low-rank factorization replaces a large matrix with two thin ones.",
]


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(f"usage: {argv[0]} BUNDLE QUERY", file=sys.stderr)
        return 2
    bundle, query = argv[1], argv[2]
    session = Session(bundle, threads=2)
    encoder = TextEncoder.from_bundle(bundle)
    report = session.provider_report()
    print(f"running on {report['active'][0]}" + (f" ({report['message']})" if report["fell_back"]
                                                   else ""))

    def embed(texts: list[str]) -> np.ndarray:
        return session.run(encoder.encode(texts, input_names=session.input_names))[
            session.output_names[0]
        ]

    scores = embed(DOCUMENTS) @ embed([query])[0]
    for score, text in sorted(zip(scores, DOCUMENTS, strict=True), reverse=True)[:3]:
        print(f"{score:.3f}  {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
