"""Awkward (reference, prediction) pairs shared by the text-metric fixture scripts.

Each exercises something a tokenizer or scorer can get wrong: empty and blank texts,
punctuation, numbers, non-ASCII letters whose lowercase is ASCII, emoji, control and
zero-width characters, Windows line ends, repeated tokens, HTML entities (sacrebleu's 13a
tokenizer unescapes them), and multi-line texts for ROUGE-Lsum.
"""

EDGE_CASES = [
    # Empty and blank.
    ("", ""),
    ("The cat sat on the mat.", ""),
    ("", "The cat sat on the mat."),
    (" ", " "),
    ("\n", "\n\n"),
    ("\t \r\n ", "a"),
    ("!!!", "???"),
    ("...", "a ..."),
    # Punctuation and numbers.
    ("It costs $3.50, not $3,50!", "It costs 3.50 dollars."),
    ("Call 555-1234 at 10:30 a.m. on 2024-05-06.", "call 5551234 at 1030 am on 20240506"),
    ("He scored 3-2 in the 90th minute (extra time).", "He scored 3 - 2 in the 90th minute [extra time]"),
    ("e-mail, e.mail and email", "email e mail"),
    ("1,000,000 people; 1.000.000 people", "1000000 people"),
    ("pi is 3.14159... roughly", "pi is about 3.14"),
    ("x=y+z*2/4", "x = y + z * 2 / 4"),
    ("don't won't can't shouldn't", "do not will not cannot should not"),
    ("\"Quoted\" 'single' `back`", "quoted single back"),
    ("a.b.c. d,e,f g-h-i", "a b c d e f g h i"),
    ("v1.2.3-beta+build.7", "version 1.2.3 beta"),
    ("A.M. vs a.m. vs AM", "am am am"),
    ("#Person1# said: \"Hi!\" -- #Person2# replied...", "Person1 said hi and Person2 replied"),
    ("end with a dash-\nand newline", "end with a dash and newline"),
    # HTML entities and markup (13a unescapes &quot; &amp; &lt; &gt;).
    ("Tom &amp; Jerry say &quot;hi&quot; &lt;3 &gt;_&lt;", "Tom & Jerry say \"hi\" <3 >_<"),
    ("&amp;quot; &amp;amp; &ampersand; & amp;", "&quot; &amp; & ;"),
    ("<skipped> text <skipped>", "text"),
    ("<b>bold</b> and <i>italic</i>", "bold and italic"),
    # Non-ASCII letters and scripts.
    ("Café naïve résumé façade", "Cafe naive resume facade"),
    ("Straße groß Maße", "strasse gross masse"),
    ("\u212aelvin \u212b ångström", "Kelvin A angstrom"),
    ("\u0130stanbul \u0131\u015f\u0131k", "Istanbul isik"),
    ("ΣΟΦΙΑ σοφία ς", "sophia"),
    ("Москва — столица России.", "Moscow is the capital of Russia."),
    ("東京は日本の首都です。", "Tokyo is the capital of Japan."),
    ("مرحبا بالعالم hello", "hello world"),
    ("emoji 😀 party 🎉🎉 end", "emoji party end 😀"),
    ("family 👨‍👩‍👧 flag 🇬🇧", "family flag"),
    ("ＦＵＬＬＷＩＤＴＨ １２３ ｔｅｘｔ", "fullwidth 123 text"),
    ("x² + y³ = z½", "x2 + y3 = z1/2"),
    ("zero\u200bwidth\u200cjoin\u200dhere", "zero width join here"),
    ("non\u00a0breaking\u2009thin\u3000ideographic", "non breaking thin ideographic"),
    ("tab\tsep\x0bvt\x0cff\x1cfs\x1dgs\x1ers\x1fus\x85nel", "tab sep vt ff fs gs rs us nel"),
    ("nul\x00char and \ufeffbom", "nul char and bom"),
    ("combining e\u0301 a\u0300 n\u0303", "combining e a n"),
    ("line\u2028separator\u2029paragraph", "line separator paragraph"),
    # Case.
    ("THE QUICK BROWN FOX", "the quick brown fox"),
    ("iPhone iOS macOS", "IPHONE IOS MACOS"),
    # Repeated tokens.
    ("the the the the the", "the"),
    ("the", "the the the the the"),
    ("a b a b a b a b", "b a b a b a b a"),
    ("go go go stop go go", "go stop go stop go"),
    ("yes " * 40, "yes no " * 20),
    # Stemmer-sensitive words.
    ("running runners ran runs", "run runner running"),
    ("generalization generalize general generally", "generalizations generalized"),
    ("dying lying tying news innings", "die lie tie new inning"),
    ("happiness happily happy happier", "happy happi"),
    ("connection connected connecting connects", "connect"),
    ("the 1990s and mp3s", "the 1990 and mp3"),
    ("skies flies dies spies", "sky fly die spy"),
    ("agreed feed proceed exceed succeed", "agree fee proceeding exceeding succeeding"),
    # Multi-line (ROUGE-Lsum).
    ("Anna calls Ben.\nBen is busy.\nThey meet at noon.", "Ben is busy.\nAnna calls him.\nThey meet at 12."),
    ("first line\n\n\nsecond line", "second line\nfirst line"),
    ("one two three\nfour five six", "one two three four five six"),
    ("one two three four five six", "one two\nthree four\nfive six"),
    ("a b c\na b c\na b c", "a b c"),
    ("a b c", "a b c\na b c\na b c"),
    ("windows\r\nline\r\nends", "windows line ends"),
    ("\n\nleading and trailing\n\n", "leading and trailing"),
    ("!!!\n???\nwords here", "words\nhere"),
    ("x y z\nz y x\ny x z", "x z y\ny z x"),
    ("the cat\nthe dog\nthe bird", "the bird\nthe cat\nthe dog"),
    ("repeat repeat\nrepeat", "repeat\nrepeat repeat repeat"),
]
