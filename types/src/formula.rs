//! Trends formulas (`spec/analytics.md` §2.4): `+ − * / ( )`, numeric constants, unary minus
//! and series ids as identifiers, evaluated point by point.
//!
//! A formula is parsed once, when the query is validated, into a small expression tree; the
//! engine then evaluates it per bucket (and per breakdown value) and once over the series'
//! range totals. A null operand (an empty aggregation) makes the result null, and a division
//! by zero gives null or 0 as the query's `divide_by_zero` says.

use serde::{Deserialize, Serialize};

/// The longest formula accepted, in bytes.
pub const MAX_FORMULA_LEN: usize = 1000;
/// The deepest nesting of parentheses and unary minus: the parser and evaluator recurse, and
/// a formula of thousands of `(` must be refused rather than overflow the stack.
pub const MAX_FORMULA_DEPTH: usize = 64;

/// Why a formula does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} at position {position}")]
pub struct FormulaError {
    /// Byte offset of the problem in the formula text (0-based).
    pub position: usize,
    /// What is wrong.
    pub message: String,
}

/// What a division by zero gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DivideByZero {
    /// Null: a gap in the chart (the default, §2.4).
    #[default]
    Null,
    /// Zero, as PostHog does.
    Zero,
}

/// A parsed formula.
#[derive(Debug, Clone, PartialEq)]
pub enum Formula {
    /// A numeric constant.
    Number(f64),
    /// A series by id.
    Series(String),
    /// Unary minus.
    Neg(Box<Formula>),
    /// A binary operation.
    Binary(Op, Box<Formula>, Box<Formula>),
}

/// A binary operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `+`
    Add,
    /// `-`
    Sub,
    /// `*`
    Mul,
    /// `/`
    Div,
}

impl Formula {
    /// Parses a formula.
    pub fn parse(text: &str) -> Result<Formula, FormulaError> {
        if text.len() > MAX_FORMULA_LEN {
            return Err(FormulaError {
                position: MAX_FORMULA_LEN,
                message: format!("longer than {MAX_FORMULA_LEN} bytes"),
            });
        }
        let tokens = tokenize(text)?;
        let mut parser = Parser {
            tokens: &tokens,
            at: 0,
            end: text.len(),
        };
        let formula = parser.expr(0)?;
        match parser.tokens.get(parser.at) {
            None => Ok(formula),
            Some((position, token)) => Err(FormulaError {
                position: *position,
                message: format!("unexpected {}", token.describe()),
            }),
        }
    }

    /// The series ids the formula names, in order of appearance (with repeats).
    pub fn series_ids(&self) -> Vec<&str> {
        let mut out = Vec::new();
        self.collect_ids(&mut out);
        out
    }

    fn collect_ids<'a>(&'a self, out: &mut Vec<&'a str>) {
        match self {
            Formula::Number(_) => {}
            Formula::Series(id) => out.push(id),
            Formula::Neg(x) => x.collect_ids(out),
            Formula::Binary(_, a, b) => {
                a.collect_ids(out);
                b.collect_ids(out);
            }
        }
    }

    /// The value of the formula with series values from `series`; null when any operand it
    /// needs is null, when a division by zero is configured to be null, or when the result is
    /// not a finite number.
    pub fn eval(&self, series: &dyn Fn(&str) -> Option<f64>, zero: DivideByZero) -> Option<f64> {
        let v = match self {
            Formula::Number(n) => *n,
            Formula::Series(id) => series(id)?,
            Formula::Neg(x) => -x.eval(series, zero)?,
            Formula::Binary(op, a, b) => {
                let a = a.eval(series, zero)?;
                let b = b.eval(series, zero)?;
                match op {
                    Op::Add => a + b,
                    Op::Sub => a - b,
                    Op::Mul => a * b,
                    Op::Div if b == 0.0 => match zero {
                        DivideByZero::Null => return None,
                        DivideByZero::Zero => 0.0,
                    },
                    Op::Div => a / b,
                }
            }
        };
        v.is_finite().then_some(v)
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Number(f64),
    Ident(String),
    Op(Op),
    Open,
    Close,
}

impl Token {
    fn describe(&self) -> String {
        match self {
            Token::Number(n) => format!("number `{n}`"),
            Token::Ident(s) => format!("`{s}`"),
            Token::Op(Op::Add) => "`+`".into(),
            Token::Op(Op::Sub) => "`-`".into(),
            Token::Op(Op::Mul) => "`*`".into(),
            Token::Op(Op::Div) => "`/`".into(),
            Token::Open => "`(`".into(),
            Token::Close => "`)`".into(),
        }
    }
}

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == '$'
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '$'
}

fn tokenize(text: &str) -> Result<Vec<(usize, Token)>, FormulaError> {
    let mut tokens = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < text.len() {
        let c = text[i..].chars().next().expect("in bounds");
        let start = i;
        let token = match c {
            c if c.is_whitespace() => {
                i += c.len_utf8();
                continue;
            }
            '+' => Token::Op(Op::Add),
            '-' => Token::Op(Op::Sub),
            '*' => Token::Op(Op::Mul),
            '/' => Token::Op(Op::Div),
            '(' => Token::Open,
            ')' => Token::Close,
            c if c.is_ascii_digit() || c == '.' => {
                // digits [. digits] [e [+-] digits]
                let mut j = i;
                while j < bytes.len() && (bytes[j].is_ascii_digit() || bytes[j] == b'.') {
                    j += 1;
                }
                if j < bytes.len() && (bytes[j] == b'e' || bytes[j] == b'E') {
                    let mut k = j + 1;
                    if k < bytes.len() && (bytes[k] == b'+' || bytes[k] == b'-') {
                        k += 1;
                    }
                    if k < bytes.len() && bytes[k].is_ascii_digit() {
                        while k < bytes.len() && bytes[k].is_ascii_digit() {
                            k += 1;
                        }
                        j = k;
                    }
                }
                let literal = &text[i..j];
                let n = literal
                    .parse::<f64>()
                    .ok()
                    .filter(|n| n.is_finite())
                    .ok_or_else(|| FormulaError {
                        position: start,
                        message: format!("invalid number `{literal}`"),
                    })?;
                if j < text.len() && text[j..].starts_with(is_ident_char) {
                    return Err(FormulaError {
                        position: j,
                        message: format!("unexpected `{}` after a number", &text[j..j + 1]),
                    });
                }
                tokens.push((start, Token::Number(n)));
                i = j;
                continue;
            }
            c if is_ident_start(c) => {
                let len = text[i..]
                    .find(|c: char| !is_ident_char(c))
                    .unwrap_or(text.len() - i);
                tokens.push((start, Token::Ident(text[i..i + len].to_string())));
                i += len;
                continue;
            }
            other => {
                return Err(FormulaError {
                    position: start,
                    message: format!(
                        "unexpected character `{other}` (formulas take + - * / ( ), numbers \
                         and series ids)"
                    ),
                });
            }
        };
        tokens.push((start, token));
        i += c.len_utf8();
    }
    Ok(tokens)
}

/// Recursive descent: `expr := term (± term)*`, `term := unary ((*|/) unary)*`,
/// `unary := − unary | primary`, `primary := number | id | ( expr )`.
struct Parser<'a> {
    tokens: &'a [(usize, Token)],
    at: usize,
    end: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at).map(|(_, t)| t)
    }

    fn position(&self) -> usize {
        self.tokens
            .get(self.at)
            .map(|(p, _)| *p)
            .unwrap_or(self.end)
    }

    fn too_deep(&self, depth: usize) -> Result<(), FormulaError> {
        if depth > MAX_FORMULA_DEPTH {
            return Err(FormulaError {
                position: self.position(),
                message: format!("nests deeper than {MAX_FORMULA_DEPTH}"),
            });
        }
        Ok(())
    }

    fn expr(&mut self, depth: usize) -> Result<Formula, FormulaError> {
        self.too_deep(depth)?;
        let mut left = self.term(depth)?;
        while let Some(Token::Op(op @ (Op::Add | Op::Sub))) = self.peek() {
            let op = *op;
            self.at += 1;
            let right = self.term(depth)?;
            left = Formula::Binary(op, Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn term(&mut self, depth: usize) -> Result<Formula, FormulaError> {
        let mut left = self.unary(depth)?;
        while let Some(Token::Op(op @ (Op::Mul | Op::Div))) = self.peek() {
            let op = *op;
            self.at += 1;
            let right = self.unary(depth)?;
            left = Formula::Binary(op, Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn unary(&mut self, depth: usize) -> Result<Formula, FormulaError> {
        if let Some(Token::Op(Op::Sub)) = self.peek() {
            self.too_deep(depth + 1)?;
            self.at += 1;
            return Ok(Formula::Neg(Box::new(self.unary(depth + 1)?)));
        }
        self.primary(depth)
    }

    fn primary(&mut self, depth: usize) -> Result<Formula, FormulaError> {
        let position = self.position();
        let Some(token) = self.peek().cloned() else {
            return Err(FormulaError {
                position,
                message: "unexpected end of formula".into(),
            });
        };
        self.at += 1;
        match token {
            Token::Number(n) => Ok(Formula::Number(n)),
            Token::Ident(id) => Ok(Formula::Series(id)),
            Token::Open => {
                let inner = self.expr(depth + 1)?;
                match self.peek() {
                    Some(Token::Close) => {
                        self.at += 1;
                        Ok(inner)
                    }
                    _ => Err(FormulaError {
                        position: self.position(),
                        message: format!("missing `)` for the `(` at position {position}"),
                    }),
                }
            }
            other => Err(FormulaError {
                position,
                message: format!("unexpected {}", other.describe()),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eval(text: &str, a: Option<f64>, b: Option<f64>, zero: DivideByZero) -> Option<f64> {
        let f = Formula::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        f.eval(
            &|id| match id {
                "A" => a,
                "B" => b,
                _ => panic!("unknown {id}"),
            },
            zero,
        )
    }

    #[test]
    fn precedence_and_associativity() {
        let z = DivideByZero::Null;
        assert_eq!(eval("A / B * 100", Some(1.0), Some(4.0), z), Some(25.0));
        assert_eq!(eval("A + B * 2", Some(1.0), Some(4.0), z), Some(9.0));
        assert_eq!(eval("(A + B) * 2", Some(1.0), Some(4.0), z), Some(10.0));
        assert_eq!(eval("A - B - 1", Some(10.0), Some(4.0), z), Some(5.0));
        assert_eq!(eval("A / B / 2", Some(8.0), Some(2.0), z), Some(2.0));
        assert_eq!(eval("-A + B", Some(1.0), Some(4.0), z), Some(3.0));
        assert_eq!(eval("A * -B", Some(2.0), Some(4.0), z), Some(-8.0));
        assert_eq!(eval("--A", Some(2.0), None, z), Some(2.0));
        assert_eq!(eval("1.5e2 + .5", None, None, z), Some(150.5));
        assert_eq!(eval("  A\t/ (B) ", Some(3.0), Some(4.0), z), Some(0.75));
    }

    #[test]
    fn division_by_zero_and_nulls() {
        assert_eq!(
            eval("A / B * 100", Some(1.0), Some(0.0), DivideByZero::Null),
            None
        );
        assert_eq!(
            eval("A / B * 100", Some(1.0), Some(0.0), DivideByZero::Zero),
            Some(0.0)
        );
        assert_eq!(eval("A + 1", None, None, DivideByZero::Zero), None);
        assert_eq!(eval("0 / 0", None, None, DivideByZero::Zero), Some(0.0));
        assert_eq!(eval("1e308 * 10", None, None, DivideByZero::Null), None);
    }

    #[test]
    fn series_ids_are_identifiers() {
        let f = Formula::parse("count / (p75 + $x_1) - count").unwrap();
        assert_eq!(f.series_ids(), ["count", "p75", "$x_1", "count"]);
    }

    #[test]
    fn malformed_formulas_say_where() {
        for (text, position, message) in [
            ("", 0, "unexpected end"),
            ("A +", 3, "unexpected end"),
            ("A B", 2, "unexpected `B`"),
            ("(A + B", 6, "missing `)`"),
            ("A + B)", 5, "unexpected `)`"),
            ("A % B", 2, "unexpected character `%`"),
            ("1.2.3", 0, "invalid number"),
            ("2A", 1, "after a number"),
            ("* A", 0, "unexpected `*`"),
            ("A(B)", 1, "unexpected `(`"),
        ] {
            let e = Formula::parse(text).expect_err(text);
            assert_eq!(e.position, position, "{text}: {e}");
            assert!(e.message.contains(message), "{text}: {e}");
        }
        let deep = format!("{}A{}", "(".repeat(100), ")".repeat(100));
        assert!(
            Formula::parse(&deep)
                .unwrap_err()
                .message
                .contains("deeper")
        );
        let negs = format!("{}A", "-".repeat(100));
        assert!(
            Formula::parse(&negs)
                .unwrap_err()
                .message
                .contains("deeper")
        );
        assert!(Formula::parse(&"A+".repeat(600)).is_err());
    }
}
