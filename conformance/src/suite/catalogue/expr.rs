//! The small expression language of case files: `where` exclusions,
//! profile conditions and tolerance `when` clauses, evaluated against one
//! case's parameters.
//!
//! Grammar (lowest precedence first): `a || b`, `a && b`, `!a`,
//! comparisons `== != < <= > >=` and `x in [v, …]`, `+ -`, `* / %`, unary
//! `-`, and atoms: numbers, `'text'` or `"text"`, `true`, `false`, names of
//! parameters, parenthesized expressions. Numbers are f64 (exact for every
//! integer a case uses); `%` is the remainder of the division.

use serde_json::Value;
use std::collections::BTreeMap;

/// A value during evaluation.
#[derive(Clone, Debug, PartialEq)]
pub enum V {
    Num(f64),
    Text(String),
    Bool(bool),
    /// An optional parameter the case does not set.
    Null,
}

impl V {
    fn kind(&self) -> &'static str {
        match self {
            V::Num(_) => "a number",
            V::Text(_) => "text",
            V::Bool(_) => "a boolean",
            V::Null => "unset",
        }
    }

    fn from_json(v: &Value) -> V {
        match v {
            Value::Number(n) => V::Num(n.as_f64().unwrap_or(f64::NAN)),
            Value::String(s) => V::Text(s.clone()),
            Value::Bool(b) => V::Bool(*b),
            _ => V::Null,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Num(f64),
    Text(String),
    Name(String),
    Op(&'static str),
}

fn lex(src: &str) -> Result<Vec<Tok>, String> {
    let c: Vec<char> = src.chars().collect();
    let mut i = 0;
    let mut out = Vec::new();
    const OPS: [&str; 20] = [
        "||", "&&", "==", "!=", "<=", ">=", "<", ">", "!", "+", "-", "*", "/", "%", "(", ")", "[",
        "]", ",", "=",
    ];
    while i < c.len() {
        let ch = c[i];
        if ch.is_whitespace() {
            i += 1;
        } else if ch.is_ascii_digit()
            || (ch == '.' && c.get(i + 1).is_some_and(|d| d.is_ascii_digit()))
        {
            let start = i;
            while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '.' || c[i] == '_') {
                // exponent sign: 1e-5
                if (c[i] == 'e' || c[i] == 'E') && matches!(c.get(i + 1), Some('-') | Some('+')) {
                    i += 1;
                }
                i += 1;
            }
            let s: String = c[start..i].iter().collect();
            let v = s
                .replace('_', "")
                .parse::<f64>()
                .map_err(|_| format!("`{s}` is not a number"))?;
            out.push(Tok::Num(v));
        } else if ch.is_alphabetic() || ch == '_' {
            let start = i;
            while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                i += 1;
            }
            out.push(Tok::Name(c[start..i].iter().collect()));
        } else if ch == '\'' || ch == '"' {
            let start = i + 1;
            i += 1;
            while i < c.len() && c[i] != ch {
                i += 1;
            }
            if i >= c.len() {
                return Err(format!("unterminated text starting at character {start}"));
            }
            out.push(Tok::Text(c[start..i].iter().collect()));
            i += 1;
        } else {
            let rest: String = c[i..c.len().min(i + 2)].iter().collect();
            let op = OPS
                .iter()
                .find(|o| rest.starts_with(**o))
                .ok_or_else(|| format!("unexpected character `{ch}`"))?;
            if *op == "=" {
                return Err("`=` is not an operator; compare with `==`".into());
            }
            out.push(Tok::Op(op));
            i += op.len();
        }
    }
    Ok(out)
}

/// A parsed expression.
#[derive(Clone, Debug, PartialEq)]
pub enum Expr {
    Lit(V),
    Name(String),
    Not(Box<Expr>),
    Neg(Box<Expr>),
    Bin(&'static str, Box<Expr>, Box<Expr>),
    In(Box<Expr>, Vec<Expr>),
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
}

impl Parser {
    fn peek_op(&self, op: &str) -> bool {
        matches!(self.toks.get(self.pos), Some(Tok::Op(o)) if *o == op)
    }
    fn eat_op(&mut self, op: &str) -> bool {
        if self.peek_op(op) {
            self.pos += 1;
            true
        } else {
            false
        }
    }
    fn expect_op(&mut self, op: &str) -> Result<(), String> {
        if self.eat_op(op) {
            Ok(())
        } else {
            Err(format!("expected `{op}` {}", self.here()))
        }
    }
    fn here(&self) -> String {
        match self.toks.get(self.pos) {
            None => "at the end".into(),
            Some(t) => format!("before {}", show_tok(t)),
        }
    }
    fn or(&mut self) -> Result<Expr, String> {
        let mut l = self.and()?;
        while self.eat_op("||") {
            l = Expr::Bin("||", Box::new(l), Box::new(self.and()?));
        }
        Ok(l)
    }
    fn and(&mut self) -> Result<Expr, String> {
        let mut l = self.not()?;
        while self.eat_op("&&") {
            l = Expr::Bin("&&", Box::new(l), Box::new(self.not()?));
        }
        Ok(l)
    }
    fn not(&mut self) -> Result<Expr, String> {
        if self.eat_op("!") {
            return Ok(Expr::Not(Box::new(self.not()?)));
        }
        self.cmp()
    }
    fn cmp(&mut self) -> Result<Expr, String> {
        let l = self.sum()?;
        for op in ["==", "!=", "<=", ">=", "<", ">"] {
            if self.eat_op(op) {
                return Ok(Expr::Bin(op, Box::new(l), Box::new(self.sum()?)));
            }
        }
        if matches!(self.toks.get(self.pos), Some(Tok::Name(n)) if n == "in") {
            self.pos += 1;
            self.expect_op("[")?;
            let mut items = Vec::new();
            if !self.eat_op("]") {
                loop {
                    items.push(self.sum()?);
                    if self.eat_op("]") {
                        break;
                    }
                    self.expect_op(",")?;
                }
            }
            return Ok(Expr::In(Box::new(l), items));
        }
        Ok(l)
    }
    fn sum(&mut self) -> Result<Expr, String> {
        let mut l = self.prod()?;
        loop {
            let op = if self.eat_op("+") {
                "+"
            } else if self.eat_op("-") {
                "-"
            } else {
                return Ok(l);
            };
            l = Expr::Bin(op, Box::new(l), Box::new(self.prod()?));
        }
    }
    fn prod(&mut self) -> Result<Expr, String> {
        let mut l = self.unary()?;
        loop {
            let op = if self.eat_op("*") {
                "*"
            } else if self.eat_op("/") {
                "/"
            } else if self.eat_op("%") {
                "%"
            } else {
                return Ok(l);
            };
            l = Expr::Bin(op, Box::new(l), Box::new(self.unary()?));
        }
    }
    fn unary(&mut self) -> Result<Expr, String> {
        if self.eat_op("-") {
            return Ok(Expr::Neg(Box::new(self.unary()?)));
        }
        if self.eat_op("!") {
            return Ok(Expr::Not(Box::new(self.unary()?)));
        }
        self.atom()
    }
    fn atom(&mut self) -> Result<Expr, String> {
        let t = self
            .toks
            .get(self.pos)
            .cloned()
            .ok_or_else(|| "the expression ends too early".to_string())?;
        self.pos += 1;
        Ok(match t {
            Tok::Num(v) => Expr::Lit(V::Num(v)),
            Tok::Text(s) => Expr::Lit(V::Text(s)),
            Tok::Name(n) if n == "true" => Expr::Lit(V::Bool(true)),
            Tok::Name(n) if n == "false" => Expr::Lit(V::Bool(false)),
            Tok::Name(n) => Expr::Name(n),
            Tok::Op("(") => {
                let e = self.or()?;
                self.expect_op(")")?;
                e
            }
            other => return Err(format!("unexpected {}", show_tok(&other))),
        })
    }
}

fn show_tok(t: &Tok) -> String {
    match t {
        Tok::Num(v) => format!("number {v}"),
        Tok::Text(s) => format!("'{s}'"),
        Tok::Name(n) => format!("`{n}`"),
        Tok::Op(o) => format!("`{o}`"),
    }
}

impl Expr {
    /// Parses an expression.
    pub fn parse(src: &str) -> Result<Expr, String> {
        let toks = lex(src)?;
        if toks.is_empty() {
            return Err("the expression is empty".into());
        }
        let mut p = Parser { toks, pos: 0 };
        let e = p.or()?;
        if p.pos != p.toks.len() {
            return Err(format!("unexpected {}", show_tok(&p.toks[p.pos])));
        }
        Ok(e)
    }

    /// Evaluates against a case's parameters. `known` names parameters
    /// that may be absent (they evaluate to unset); any other unknown name
    /// is an error.
    pub fn eval(
        &self,
        params: &BTreeMap<String, Value>,
        known: &dyn Fn(&str) -> bool,
    ) -> Result<V, String> {
        Ok(match self {
            Expr::Lit(v) => v.clone(),
            Expr::Name(n) => match params.get(n) {
                Some(v) => V::from_json(v),
                None if known(n) => V::Null,
                None => return Err(format!("unknown name `{n}`")),
            },
            Expr::Not(e) => V::Bool(!truth(&e.eval(params, known)?)?),
            Expr::Neg(e) => match e.eval(params, known)? {
                V::Num(x) => V::Num(-x),
                v => return Err(format!("cannot negate {}", v.kind())),
            },
            Expr::In(a, items) => {
                let x = a.eval(params, known)?;
                let mut found = false;
                for i in items {
                    if equal(&x, &i.eval(params, known)?) {
                        found = true;
                        break;
                    }
                }
                V::Bool(found)
            }
            Expr::Bin(op, a, b) => {
                if *op == "&&" {
                    return Ok(V::Bool(
                        truth(&a.eval(params, known)?)? && truth(&b.eval(params, known)?)?,
                    ));
                }
                if *op == "||" {
                    return Ok(V::Bool(
                        truth(&a.eval(params, known)?)? || truth(&b.eval(params, known)?)?,
                    ));
                }
                let (x, y) = (a.eval(params, known)?, b.eval(params, known)?);
                match *op {
                    "==" => V::Bool(equal(&x, &y)),
                    "!=" => V::Bool(!equal(&x, &y)),
                    "<" | "<=" | ">" | ">=" => {
                        let ord = match (&x, &y) {
                            (V::Num(p), V::Num(q)) => p.partial_cmp(q),
                            (V::Text(p), V::Text(q)) => Some(p.cmp(q)),
                            _ => None,
                        }
                        .ok_or_else(|| format!("cannot compare {} with {}", x.kind(), y.kind()))?;
                        V::Bool(match *op {
                            "<" => ord.is_lt(),
                            "<=" => ord.is_le(),
                            ">" => ord.is_gt(),
                            _ => ord.is_ge(),
                        })
                    }
                    _ => {
                        let (V::Num(p), V::Num(q)) = (&x, &y) else {
                            return Err(format!(
                                "`{op}` needs numbers, got {} and {}",
                                x.kind(),
                                y.kind()
                            ));
                        };
                        if matches!(*op, "/" | "%") && *q == 0.0 {
                            return Err(format!("`{op}` by zero"));
                        }
                        V::Num(match *op {
                            "+" => p + q,
                            "-" => p - q,
                            "*" => p * q,
                            "/" => p / q,
                            _ => p % q,
                        })
                    }
                }
            }
        })
    }

    /// Evaluates to a boolean (an error for any other value).
    pub fn test(
        &self,
        params: &BTreeMap<String, Value>,
        known: &dyn Fn(&str) -> bool,
    ) -> Result<bool, String> {
        truth(&self.eval(params, known)?)
    }
}

fn equal(x: &V, y: &V) -> bool {
    match (x, y) {
        (V::Num(p), V::Num(q)) => p == q,
        (V::Bool(p), V::Num(q)) | (V::Num(q), V::Bool(p)) => (*p as u8 as f64) == *q,
        _ => x == y,
    }
}

fn truth(v: &V) -> Result<bool, String> {
    match v {
        V::Bool(b) => Ok(*b),
        other => Err(format!(
            "expected a condition (true/false), got {}",
            other.kind()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(src: &str, kv: &[(&str, Value)]) -> Result<V, String> {
        let p: BTreeMap<String, Value> =
            kv.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        Expr::parse(src)?.eval(&p, &|n| n == "opt")
    }

    #[test]
    fn arithmetic_comparison_and_logic() {
        let p = [
            ("h_q", Value::from(126)),
            ("h_kv", Value::from(8)),
            ("dtype", Value::from("bf16")),
        ];
        assert_eq!(ev("h_q % h_kv == 0", &p), Ok(V::Bool(false)));
        assert_eq!(ev("h_q % h_kv != 0", &p), Ok(V::Bool(true)));
        assert_eq!(ev("h_q / 2 + 1 * 3 - 1", &p), Ok(V::Num(65.0)));
        assert_eq!(ev("-(h_kv) < 0 && dtype == 'bf16'", &p), Ok(V::Bool(true)));
        assert_eq!(ev("!(h_kv in [1, 2, 8]) || false", &p), Ok(V::Bool(false)));
        assert_eq!(ev("h_q in [1, 3]", &p), Ok(V::Bool(false)));
        assert_eq!(ev("1e-5 < 2.5e-3", &p), Ok(V::Bool(true)));
        assert_eq!(ev("opt == 1", &p), Ok(V::Bool(false)));
        assert_eq!(ev("true == 1", &p), Ok(V::Bool(true)));
    }

    #[test]
    fn errors_are_reported() {
        let p = [("a", Value::from(1)), ("t", Value::from("x"))];
        assert!(ev("b == 1", &p).unwrap_err().contains("unknown name `b`"));
        assert!(ev("a = 1", &p).unwrap_err().contains("=="));
        assert!(ev("a +", &p).is_err());
        assert!(ev("(a == 1", &p).unwrap_err().contains("`)`"));
        assert!(ev("t + 1", &p).unwrap_err().contains("needs numbers"));
        assert!(ev("a % 0", &p).unwrap_err().contains("by zero"));
        assert!(ev("a", &p).is_ok());
        assert!(Expr::parse("a")
            .unwrap()
            .test(&BTreeMap::new(), &|_| true)
            .is_err());
        assert!(ev("'open", &p).unwrap_err().contains("unterminated"));
        assert!(ev("a == 1 1", &p).is_err());
        assert!(ev("", &p).is_err());
    }
}
