"""Write the quickstart's bundled data, ``plugins/data/bank_intent_quickstart.jsonl``.

    $ python bench/make_intent_quickstart.py [--out plugins/data/bank_intent_quickstart.jsonl]

English customer messages for five bank intents, written by hand for ftkit (nothing is taken from
a public dataset): each intent has twelve *cues*, different ways of saying the same need, and each
cue is wrapped in eight conversational templates. Every row records its cue, and the quickstart
recipe splits with ``group_by = "cue"``: no test message shares its cue with a training message,
so the test measures whether the model learnt the intent, not whether it memorised a phrase. The
templates carry no information about the intent.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

CUES: dict[str, tuple[str, ...]] = {
    "lost or stolen card": (
        "I lost my debit card",
        "my wallet was stolen with all my cards in it",
        "I can't find my credit card anywhere",
        "someone pickpocketed me on the train and took my card",
        "I left my card in a taxi last night",
        "my card was taken from my bag at the gym",
        "I think I dropped my bank card at the supermarket",
        "my purse got snatched and my card was inside",
        "my card fell out of my pocket somewhere downtown",
        "I misplaced my card after moving house",
        "a thief broke into my car and took my cards",
        "my daughter lost the card I gave her",
    ),
    "refund request": (
        "I want my money back for a cancelled order",
        "the shop agreed to refund me but nothing has arrived",
        "I returned the shoes two weeks ago and still have no refund",
        "please give me back the money for a faulty laptop",
        "the airline cancelled my flight and owes me a refund",
        "I was charged for a subscription I cancelled and want it reimbursed",
        "the hotel promised to reimburse my deposit",
        "how long does a refund from a merchant take to reach my account",
        "I sent the package back, where is my reimbursement",
        "the concert was called off and I need my ticket money returned",
        "I paid twice for the same dinner, please return one payment",
        "the store says the refund was issued but I can't see it",
    ),
    "account balance": (
        "how much money do I have in my account",
        "what is my current balance",
        "can you tell me how much is left in my savings",
        "I want to check my available funds before I go shopping",
        "is my salary in yet and how much do I have now",
        "show me the amount in my checking account",
        "how much can I still spend this month",
        "what's the total sitting in my account today",
        "I need to know my balance before paying rent",
        "do I have enough money left to cover the electricity bill",
        "please tell me my account total",
        "how much is in our joint account right now",
    ),
    "suspected fraud": (
        "there is a payment on my statement that I never made",
        "someone used my card in another country",
        "I got a text asking for my PIN, is it a scam",
        "an unknown company took money from my account",
        "I see purchases I don't recognise",
        "a stranger called pretending to be the bank and asked for my password",
        "my account was charged by an online store I have never used",
        "I think my card details were stolen online",
        "there are three withdrawals I did not authorise",
        "I clicked a suspicious link and now money is missing",
        "somebody is spending money from my card without permission",
        "an email claiming to be from you asked me to confirm my login",
    ),
    "money transfer": (
        "how do I send money to my brother",
        "I want to move cash to my friend's account",
        "please transfer 200 pounds to my landlord",
        "how can I pay someone abroad",
        "I need to wire money to another bank",
        "can I send funds to my savings account",
        "set up a payment to my mother every month",
        "how long does an international transfer take",
        "I want to pay my friend back for dinner by bank transfer",
        "how do I move money between my two accounts",
        "send 50 euros to my sister in Spain",
        "what details do I need to transfer money to a new payee",
    ),
}

TEMPLATES = (
    "{cue}",
    "Hi, {cue}.",
    "Hello, {cue}. Can you help me?",
    "{Cue}, what should I do?",
    "Good morning! {cue}.",
    "Quick question: {cue}?",
    "{Cue}. Please help, thanks.",
    "Hey there, {cue}!",
)


def rows() -> list[dict[str, str]]:
    out = []
    for label, cues in CUES.items():
        for cue in cues:
            for template in TEMPLATES:
                text = template.format(cue=cue, Cue=cue[0].upper() + cue[1:])
                out.append({"text": text[0].upper() + text[1:], "label": label, "cue": cue})
    return out


def main() -> None:
    default = Path(__file__).resolve().parent.parent / "plugins" / "data" / "bank_intent_quickstart.jsonl"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=default)
    args = parser.parse_args()
    data = rows()
    args.out.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in data), encoding="utf-8")
    print(f"wrote {len(data)} rows ({len(CUES)} intents x 12 cues x {len(TEMPLATES)} templates) to {args.out}")


if __name__ == "__main__":
    main()
