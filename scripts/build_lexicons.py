"""Builds the anchor lexicons shipped in anchor_kernels/lexicons/ from packages on PyPI.

    pip install vaderSentiment==3.3.2 better-profanity==0.7.0
    python scripts/build_lexicons.py

Words are derived, not typed, wherever a well-kept package holds them. The honest dimension has
no such package, so its short lists are written here. Each JSON file records its sources and
licences.
"""
import json
import re
from importlib import metadata, resources
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "anchor_kernels" / "lexicons"
WORD = re.compile(r"^[a-z]{3,14}$")
VADER_WORD = re.compile(r"^[a-z]{4,14}$")  # VADER also rates chat abbreviations ("ily", "lya")
PER_SIDE = 80


def vader():
    text = (resources.files("vaderSentiment") / "vader_lexicon.txt").read_text(encoding="utf-8")
    scores = {}
    for line in text.splitlines():
        token, mean, *_ = line.split("\t")
        if VADER_WORD.match(token):
            scores[token] = float(mean)
    return scores


def profanity():
    text = (resources.files("better_profanity") / "profanity_wordlist.txt").read_text(encoding="utf-8")
    return sorted({w.strip() for w in text.splitlines() if WORD.match(w.strip())})


def strongest(scores, sign, threshold):
    words = [w for w, s in scores.items() if sign * s >= threshold]
    return sorted(words, key=lambda w: (-sign * scores[w], w))[:PER_SIDE]


def source(package, what):
    return {"package": package, "version": metadata.version(package), "licence": "MIT", "what": what}


# Written for this project (CC0): no PyPI package lists these.
SAFE_WORDS = ["safe", "safely", "safety", "sorry", "apologize", "cannot", "unable", "refuse", "careful",
              "respect", "respectful", "help", "helpful", "protect", "kind", "legal", "ethical",
              "responsible", "consent", "support", "peaceful", "gentle", "harmless", "caution"]
HONEST_WORDS = ["honest", "honestly", "truth", "true", "truthful", "accurate", "fact", "facts", "sincere",
                "transparent", "evidence", "verified", "correct", "uncertain", "admit", "genuine", "real",
                "reliable", "candid", "precisely"]
DISHONEST_WORDS = ["lie", "lies", "lying", "liar", "fake", "false", "deceive", "deceptive", "mislead",
                   "misleading", "fraud", "hoax", "cheat", "pretend", "fabricated", "rumor", "bogus",
                   "scam", "invented", "exaggerate"]
# civil: courtesy against hostility, with the hygiene issue 21 asked for: no compliance words
# ("help", "helpful", "sure": they turned a refusal into "as a helpful AI, I can help with that"),
# no refusal words ("sorry", "cannot": a neutral question is not to be refused), and no topical
# negative words ("cancer", "dead", "war": a factual answer about the flu or the Titanic needs them).
# Insults and threats only. Words that are several tokens in a model's vocabulary ("idiot",
# "damn" in SmolLM2's) are dropped by AnchorSet.from_words: their first piece is a fragment.
COURTESY_WORDS = ["kind", "kindly", "kindness", "respect", "respectful", "polite", "politely", "gentle",
                  "gently", "patient", "patience", "calm", "calmly", "compassion", "compassionate", "empathy",
                  "appreciate", "grateful", "friendly", "warm", "fair", "caring", "thoughtful", "constructive",
                  "peaceful", "civil", "decent", "generous", "considerate", "courteous"]
HOSTILE_WORDS = ["stupid", "dumb", "idiot", "idiots", "moron", "loser", "pathetic", "worthless", "useless",
                 "ugly", "hate", "hated", "hateful", "fool", "foolish", "trash", "garbage", "scum", "suck",
                 "sucks", "shut", "lazy", "incompetent", "ignorant", "clown", "creep", "nasty", "disgusting",
                 "ridiculous", "annoying", "rude", "selfish", "jerk", "retard", "kill", "punch", "hurt",
                 "destroy", "revenge", "threaten", "humiliate", "damn", "crap", "shit", "fuck", "fucking",
                 "bitch", "bastard", "asshole"]
PROJECT = {"source": "written for anchor_kernels (scripts/build_lexicons.py)", "licence": "CC0-1.0"}


def main():
    scores = vader()
    lexicons = {
        "positive_sentiment": dict(
            description="positive vs negative sentiment: the strongest VADER valences (|mean| >= 2.5)",
            positive=strongest(scores, +1, 2.5), negative=strongest(scores, -1, 2.5),
            provenance=[source("vaderSentiment", "vader_lexicon.txt, mean valence of 10 raters")]),
        "harmless": dict(
            description="harmless vs harmful/toxic: care and refusal words vs profanity and the most "
                        "negative VADER words (violence, abuse, hate; mean valence <= -3)",
            positive=SAFE_WORDS,
            negative=sorted(set(strongest(scores, -1, 3.0)) | set(profanity()[:PER_SIDE])),
            provenance=[PROJECT, source("better-profanity", "profanity_wordlist.txt"),
                        source("vaderSentiment", "vader_lexicon.txt")]),
        "civil": dict(
            description="courtesy vs hostility: kind and respectful words vs insults, profanity and threats "
                        "(no compliance, refusal or topical words: see scripts/build_lexicons.py)",
            positive=COURTESY_WORDS, negative=HOSTILE_WORDS, provenance=[PROJECT]),
        "honest": dict(
            description="honesty vs deception words",
            positive=HONEST_WORDS, negative=DISHONEST_WORDS, provenance=[PROJECT]),
    }
    OUT.mkdir(exist_ok=True)
    for name, lexicon in lexicons.items():
        clash = set(lexicon["positive"]) & set(lexicon["negative"])
        assert not clash, (name, clash)
        (OUT / f"{name}.json").write_text(json.dumps({"name": name, **lexicon}, indent=1) + "\n")
        print(f"{name}: {len(lexicon['positive'])} positive, {len(lexicon['negative'])} negative")


if __name__ == "__main__":
    main()
