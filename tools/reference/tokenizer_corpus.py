"""The tokenizer test corpus: hand-picked lines plus systematic variations.

Each line exercises a pre-tokenizer or BPE edge: digit runs (single-digit and 1-3 digit
splitting), whitespace runs before words and digits (the `\\s+(?!\\S)` look-ahead), the Unicode
White_Space set and its near misses, contractions in both cases, scripts with and without spaces,
emoji sequences, control characters and special tokens inside text.
"""

PROSE = [
    "Hello world! 123",
    "The quick brown fox jumps over the lazy dog.",
    "It was the best of times, it was the worst of times, it was the age of wisdom.",
    "In 1492, Columbus sailed the ocean blue; in 1969, Apollo 11 landed on the Moon.",
    "She sells sea-shells by the sea-shore (allegedly).",
    "Mr. O'Neil's dog—a terrier—barked at 3 a.m. \"Again?\" he asked.",
    "A sentence with trailing spaces   ",
    "   leading spaces and a tab\tinside",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.",
    "Line one\nLine two\n\nLine four after a blank line\n",
    "Windows line endings\r\nsecond line\r\n",
    "Ellipsis... and em-dash — and en–dash and bullet • point",
    "Quotes: «French», „German“, “English”, ‘single’, 「Japanese」",
    "CamelCaseIdentifiersAreCommon inSourceCode andJSONKeys",
    "ALL CAPS SHOUTING IS STILL TEXT!!!",
    "snake_case_names_and__double__underscores",
    "Hyphen-ated-words-are-everywhere-in-English",
    "Parenthetical (remarks [nested {deeply}]) end.",
    "Tabs\tbetween\twords\tand\t\tdouble\t\ttabs",
    "Trailing newline\n",
    "\n\n\nleading newlines",
    "a",
    " ",
    "",
    "!",
    "?!?!",
    "#hashtag @mention $TICKER %percent ^caret &amp *star",
    "Price: $1,299.99 (was €1.499,00; ¥150,000; £999)",
    "Temperature: -40°C = -40°F; 100 km/h ≈ 62.1 mph",
]

LANGUAGES = [
    "Café crème brûlée à la française, naïve façade, jalapeño piñata.",
    "Größe, Straße, Übermäßig, Äpfel und Öl",
    "¿Dónde está la biblioteca? ¡Aquí!",
    "Ça va? Où êtes-vous? Noël à l'hôtel.",
    "Decomposed: Cafe\u0301 and n\u0303 and A\u030a",
    "Привет, мир! Как дела? Съешь же ещё этих мягких французских булок.",
    "Γειά σου Κόσμε· αλφα βήτα γάμμα δέλτα",
    "مرحبا بالعالم! كيف حالك؟",
    "שלום עולם, מה שלומך?",
    "नमस्ते दुनिया, आप कैसे हैं?",
    "สวัสดีชาวโลก ภาษาไทยไม่มีช่องว่างระหว่างคำ",
    "안녕하세요 세계! 한국어 텍스트입니다.",
    "こんにちは世界。日本語のテキストです。カタカナとひらがな。",
    "你好，世界！这是中文文本，没有空格。",
    "繁體中文：臺灣的資訊科技產業發展迅速。",
    "Tiếng Việt có dấu: Xin chào thế giới",
    "Türkçe: İstanbul, ığdır, şişe, çiçek, öğün",
    "Polski: Zażółć gęślą jaźń",
    "Ελληνικά και English mixed 混合 テキスト",
    "Ꭰ Ꭱ Ꭲ Cherokee, ᚠᚢᚦ runes, 𐌰𐌱𐌲 Gothic",
    "Mathematical letters: 𝐀𝐁𝐂 𝑥𝑦𝑧 𝔸𝔹ℂ",
    "Full-width: ＡＢＣ ａｂｃ １２３ ！？",
    "Arabic-Indic digits ٠١٢٣٤٥٦٧٨٩ and Devanagari ०१२३",
    "Long s: 'ſ and Kelvin K and Angstrom Å",
    "ǅ ǈ ǋ titlecase digraphs",
    "Ligatures: ﬁ ﬂ ﬀ ﬃ",
    "Zero width: a\u200bb c\u200cd e\u200df \ufeffBOM",
    "Combining marks: e\u0301\u0302\u0303 a\u0308",
    "Soft\u00adhyphen and non\u2011breaking hyphen",
    # Assigned after Unicode 14 (letters, digits), and U+180E, no longer a space.
    "New: x\u1c89\u1c8a \U000105c0\U000105c1 \U00010d40\U00010d41 \U00011de0\U00011de1 "
    "\U00016ff4 a\u180e\u180eb",
]

CODE = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "import numpy as np\nx = np.zeros((3, 4), dtype=np.float32)\nprint(x.shape)",
    "class Foo:\n\tdef __init__(self):\n\t\tself.bar = {'a': 1, \"b\": [2, 3]}\n",
    "#include <iostream>\nint main() {\n  std::cout << \"Hello\" << std::endl;\n  return 0;\n}\n",
    "template <typename T>\nstd::vector<T> Take(std::span<const T> xs, size_t n);",
    "fn main() {\n    let v: Vec<i32> = (0..10).map(|x| x * x).collect();\n    println!(\"{:?}\", v);\n}",
    "package main\n\nimport \"fmt\"\n\nfunc main() {\n\tfmt.Println(\"hi\")\n}\n",
    "const add = (a, b) => a + b;\nconsole.log(`sum: ${add(1, 2)}`);",
    "function f(x) { return x === null ? undefined : x?.y ?? 0; }",
    "SELECT id, name FROM users WHERE age >= 18 AND name LIKE 'A%' ORDER BY id DESC;",
    "<html><head><title>Test</title></head><body><p class=\"x\">Hi &amp; bye</p></body></html>",
    "{\"key\": \"value\", \"num\": 42, \"arr\": [1, 2.5, -3e10], \"nested\": {\"ok\": true}}",
    "server:\n  port: 8080\n  hosts:\n    - a.example.com\n    - b.example.com\n",
    "#!/bin/bash\nset -euo pipefail\nfor f in *.txt; do echo \"$f\"; done\n",
    "\\begin{equation}\n  E = mc^2 \\quad \\int_0^\\infty e^{-x^2} dx = \\frac{\\sqrt{\\pi}}{2}\n\\end{equation}",
    "    indented with four spaces\n        and eight\n            and twelve",
    "x=1;y=2;z=x+y*3-4/5%6",
    "a != b && c <= d || e >= f << 2 >> 3",
    "if (x) {\n} else if (y) {\n} else {\n}\n",
    "// comment\n/* block\n   comment */\n# python comment\n-- sql comment",
    "0x7FFFFFFF 0b1010 0o777 1e-9 3.14159f 1_000_000",
    "regex: ^[a-zA-Z0-9._%+-]+@[a-zA-Z0-9.-]+\\.[a-zA-Z]{2,}$",
    "path/to/file.txt C:\\Users\\Name\\Documents\\file.docx ~/.config/app.yaml",
    "git commit -m \"Fix bug #123\" && git push origin main",
    "  def method(self):  # trailing comment  \n        pass",
    "matrix = [[1, 2, 3],\n          [4, 5, 6],\n          [7, 8, 9]]",
]

NUMBERS_AND_DATES = [
    "2024-01-15",
    "2024-01-15T13:45:30.123Z",
    "15/01/2024 and 01/15/2024 and 15.01.2024",
    "Jan 15, 2024 at 1:45 PM",
    "Phone: +1 (555) 123-4567",
    "IPv4 192.168.1.1 and IPv6 2001:0db8:85a3::8a2e:0370:7334",
    "Version 3.11.4-rc2+build.567",
    "3.14159265358979323846264338327950288419716939937510",
    "1,234,567,890",
    "1 234 567 890",
    "−42 and -42 and +42 and ±42",
    "1st 2nd 3rd 4th 21st 101st",
    "½ ¼ ¾ ⅓ ⅔ ⅛",
    "x² + y³ = z⁴; H₂O; CO₂",
    "① ② ③ ⑩ ⑳",
    "Roman: Ⅰ Ⅱ Ⅲ Ⅳ Ⅻ ⅿ",
    "123abc456def789",
    "a1b2c3d4e5",
    "v1.2.3",
    "12:00 24:00 23:59:59",
    "99.9% uptime, 0.01% error",
    "Pi is approximately 3.14 and e is 2.718",
]

MATH = [
    "∑_{i=1}^{n} i = n(n+1)/2",
    "∀x ∈ ℝ, ∃y ∈ ℕ: x < y",
    "∫₀¹ f(x) dx ≤ ∞",
    "α + β = γ; Δx → 0; ∂f/∂x",
    "√2 ≈ 1.41421356; ∛27 = 3",
    "A ∪ B ∩ C ⊆ D ⊂ E; ¬p ∧ q ∨ r ⇒ s ⇔ t",
    "f: X → Y, g ∘ f, x ↦ x²",
    "3 × 4 ÷ 2 = 6; 5 ≠ 6; 7 ≥ 6",
    "matrix ⎡1 0⎤ ⎣0 1⎦",
    "P(A|B) = P(B|A)·P(A)/P(B)",
]

URLS = [
    "https://www.example.com/path/to/page?query=value&other=123#section",
    "http://localhost:8080/api/v1/users/42",
    "Visit https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct for details.",
    "mailto:someone@example.org",
    "ftp://files.example.net/pub/file-1.2.3.tar.gz",
    "Email me at john.doe+tag@sub.example.co.uk!",
    "www.example.com/über/straße?q=日本",
]

EMOJI = [
    "I love pizza 🍕🍕🍕!",
    "👍 👍🏻 👍🏼 👍🏽 👍🏾 👍🏿",
    "Family: 👨‍👩‍👧‍👦 and couple 👩‍❤️‍👨",
    "Flags: 🇺🇸 🇫🇷 🇯🇵 🏳️‍🌈 🏴‍☠️",
    "Keycaps: 1️⃣ 2️⃣ #️⃣ *️⃣",
    "Professions: 👩‍💻 👨‍🔬 🧑‍🚀",
    "Hearts ❤️ 🧡 💛 💚 💙 💜 🖤",
    "😀😃😄😁😆😅🤣😂🙂🙃",
    "Emoji without spaces🎉between🎊words",
    "✓ ✔ ✗ ✘ ★ ☆ ♠ ♣ ♥ ♦",
    "Text with variation selector ☺︎ vs ☺️",
    "🏃‍♀️‍➡️ running right",
]

CONTROL = [
    "bell\x07 and escape\x1b[31mred\x1b[0m",
    "null\x00byte",
    "form\x0cfeed and vertical\x0btab",
    "delete\x7fchar",
    "separators\x1c\x1d\x1e\x1f end",
    "\x01\x02\x03\x04\x05",
    "C1 controls: \x80\x85\x9f",
    "backspace\x08\x08x",
]

SPECIAL_TOKENS = [
    "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n",
    "text before <|endoftext|> text after",
    "<|endoftext|><|endoftext|>",
    "abc<|im_end|>def",
    "<|im_start|><|im_end|>",
    "<|im_start",
    "<|im_start|",
    "im_start|>",
    "<|IM_START|>",
    "< |im_start|>",
    "<<|im_start|>>",
    "<|im_start|><|im_start|>system",
    " <|im_end|> ",
    "<repo_name>kvtrim<file_sep>main.cc<filename>x.py",
    "<jupyter_start><jupyter_code>print(1)<jupyter_output>1<empty_output>",
    "<issue_start>bug<issue_comment>fixed<issue_closed>",
    "<gh_stars>100<reponame>r<jupyter_text>t<jupyter_script>s",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
    "<s>[INST] not special here [/INST]</s>",
    "<tool> is a user token in the tiny tokenizer <tool>x</tool>",
]

CONTRACTIONS = [
    "don't won't can't shouldn't",
    "DON'T WON'T CAN'T",
    "I'LL I'll i'll I'M I'm I'VE I've",
    "we've they're she'd it's he's",
    "WE'VE THEY'RE SHE'D IT'S",
    "'s 't 're 've 'm 'll 'd",
    "'S 'T 'RE 'VE 'M 'LL 'D",
    "rock'n'roll y'all o'clock ma'am",
    "don’t it’s (typographic apostrophes)",
    "''quoted'' and 'single' and '''triple'''",
    "James's and James' and the Joneses'",
    "'tis 'twas",
    "it'S mIxEd 'Ll 'rE",
]


def digit_lines():
    lines = []
    for n in (1, 2, 3, 4, 5, 6, 7, 9, 12, 16, 20, 25, 33, 40):
        run = "".join(str((i * 7 + 3) % 10) for i in range(n))
        lines += [run, " " + run, "x" + run, "$" + run + ".00", "-" + run + "-"]
    lines += ["0" * 30, "9" * 17, "1234567890" * 4, "3 14 159 2653 58979"]
    return lines


def whitespace_lines():
    runs = [" ", "  ", "   ", "    ", "\t", "\t\t", "\n", "\n\n", " \n", "\n ", "\r\n", " \t ",
            "  \n  ", "\n\n\n\n"]
    contexts = [("a", "b"), ("a", "1"), ("1", "2"), ("x", ""), ("", "x"), ("!", "?"), ("é", "ü")]
    return [left + run + right for run in runs for left, right in contexts]


def unicode_space_lines():
    # White_Space code points and near misses (U+180E, U+200B, U+FEFF, U+001C..U+001F).
    code_points = [0x0B, 0x0C, 0x85, 0xA0, 0x1680, 0x180E, 0x2000, 0x2003, 0x2007, 0x200A, 0x200B,
                   0x2028, 0x2029, 0x202F, 0x205F, 0x3000, 0xFEFF, 0x1C, 0x1F]
    lines = []
    for cp in code_points:
        c = chr(cp)
        lines += ["a" + c + c + "b", "x" + c + "1" + c, c + " word " + c]
    return lines


def special_token_contexts():
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<file_sep>"]
    out = []
    for token in tokens:
        out += [token, "x" + token + "y", " " + token, token + " ", "1" + token + "2",
                "\n" + token + "\n"]
    return out


def corpus():
    lines = (PROSE + LANGUAGES + CODE + NUMBERS_AND_DATES + MATH + URLS + EMOJI + CONTROL +
             SPECIAL_TOKENS + CONTRACTIONS + digit_lines() + whitespace_lines() +
             unicode_space_lines() + special_token_contexts())
    seen = set()
    unique = []
    for line in lines:
        if line not in seen:
            seen.add(line)
            unique.append(line)
    return unique
