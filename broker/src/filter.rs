//! Consumer filters: tag expressions (`*`, `a || b`) and SQL92 conditions over a message's
//! properties (`a > 3 AND b IN ('x', 'y')`). The tag `TAGS` is a property SQL can test too.

use std::collections::HashSet;

use ferrumq_protocol::v2::{Code, FilterType};
use ferrumq_storage::{PropertiesRef, keys, tag_hash};

use crate::error::{ApiError, ApiResult};

/// A parsed filter. Parse once per request, then test each message.
#[derive(Debug, Clone, PartialEq)]
pub enum Filter {
    All,
    /// Any of these tags; the hashes let the consume queue's tag hash reject most messages
    /// without reading them.
    Tags {
        tags: HashSet<String>,
        hashes: HashSet<u64>,
    },
    Sql(Expr),
}

impl Filter {
    /// Reads a filter expression. `filter_type` is the wire's `FilterType` number: TAG, SQL,
    /// or UNSPECIFIED (read as TAG, as RocketMQ's proxy does); any other is refused, naming the
    /// field, rather than guessed.
    pub fn parse(filter_type: i32, expression: &str) -> ApiResult<Filter> {
        let Ok(filter_type) = FilterType::try_from(filter_type) else {
            return Err(ApiError::new(
                Code::IllegalFilterExpression,
                format!(
                    "filter_expression.type {filter_type} is not a known FilterType \
                     (TAG = 1, SQL = 2)"
                ),
            ));
        };
        match filter_type {
            FilterType::Tag | FilterType::Unspecified => Filter::tags(expression),
            FilterType::Sql => sql::parse(expression).map(Filter::Sql).map_err(|reason| {
                ApiError::new(
                    Code::IllegalFilterExpression,
                    format!("filter_expression.expression {expression:?}: {reason}"),
                )
            }),
        }
    }

    fn tags(expression: &str) -> ApiResult<Filter> {
        let expression = expression.trim();
        if expression.is_empty() || expression == "*" {
            return Ok(Filter::All);
        }
        let mut tags = HashSet::new();
        for tag in expression.split("||").map(str::trim) {
            if tag.is_empty() {
                return Err(ApiError::new(
                    Code::IllegalFilterExpression,
                    format!("filter_expression.expression {expression:?} has an empty tag"),
                ));
            }
            if tag == "*" {
                return Ok(Filter::All);
            }
            tags.insert(tag.to_owned());
        }
        let hashes = tags.iter().map(|t| tag_hash(t)).collect();
        Ok(Filter::Tags { tags, hashes })
    }

    /// False if the consume-queue entry's tag hash already rules the message out.
    pub fn may_match(&self, entry_tag_hash: u64) -> bool {
        match self {
            Filter::Tags { hashes, .. } => hashes.contains(&entry_tag_hash),
            Filter::All | Filter::Sql(_) => true,
        }
    }

    pub fn matches(&self, properties: &PropertiesRef<'_>) -> bool {
        match self {
            Filter::All => true,
            Filter::Tags { tags, .. } => {
                properties.get(keys::TAG).is_some_and(|t| tags.contains(t))
            }
            Filter::Sql(expr) => expr.eval(properties) == Some(Value::Bool(true)),
        }
    }
}

/// A SQL92 condition.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Property(String),
    Literal(Value),
    Not(Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Compare(Box<Expr>, CompareOp, Box<Expr>),
    In {
        value: Box<Expr>,
        list: Vec<Value>,
        negated: bool,
    },
    Between {
        value: Box<Expr>,
        low: Box<Expr>,
        high: Box<Expr>,
        negated: bool,
    },
    IsNull {
        value: Box<Expr>,
        negated: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompareOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(String),
    Num(f64),
    Bool(bool),
}

impl Expr {
    /// SQL's three-valued logic: `None` is UNKNOWN (a missing property, a type mismatch).
    pub fn eval(&self, properties: &PropertiesRef<'_>) -> Option<Value> {
        match self {
            Expr::Property(name) => properties.get(name).map(property_value),
            Expr::Literal(v) => Some(v.clone()),
            Expr::Not(inner) => match inner.eval(properties)? {
                Value::Bool(b) => Some(Value::Bool(!b)),
                _ => None,
            },
            Expr::And(a, b) => {
                let a = truth(a.eval(properties));
                let b = truth(b.eval(properties));
                match (a, b) {
                    (Some(false), _) | (_, Some(false)) => Some(Value::Bool(false)),
                    (Some(true), Some(true)) => Some(Value::Bool(true)),
                    _ => None,
                }
            }
            Expr::Or(a, b) => {
                let a = truth(a.eval(properties));
                let b = truth(b.eval(properties));
                match (a, b) {
                    (Some(true), _) | (_, Some(true)) => Some(Value::Bool(true)),
                    (Some(false), Some(false)) => Some(Value::Bool(false)),
                    _ => None,
                }
            }
            Expr::Compare(a, op, b) => {
                let ordering = compare(&a.eval(properties)?, &b.eval(properties)?)?;
                let result = match op {
                    CompareOp::Eq => ordering.is_eq(),
                    CompareOp::Ne => ordering.is_ne(),
                    CompareOp::Lt => ordering.is_lt(),
                    CompareOp::Le => ordering.is_le(),
                    CompareOp::Gt => ordering.is_gt(),
                    CompareOp::Ge => ordering.is_ge(),
                };
                Some(Value::Bool(result))
            }
            Expr::In {
                value,
                list,
                negated,
            } => {
                let v = value.eval(properties)?;
                let found = list
                    .iter()
                    .any(|item| compare(&v, item).is_some_and(|o| o.is_eq()));
                Some(Value::Bool(found != *negated))
            }
            Expr::Between {
                value,
                low,
                high,
                negated,
            } => {
                let v = value.eval(properties)?;
                let inside = compare(&v, &low.eval(properties)?)?.is_ge()
                    && compare(&v, &high.eval(properties)?)?.is_le();
                Some(Value::Bool(inside != *negated))
            }
            Expr::IsNull { value, negated } => {
                Some(Value::Bool(value.eval(properties).is_none() != *negated))
            }
        }
    }
}

fn truth(value: Option<Value>) -> Option<bool> {
    match value {
        Some(Value::Bool(b)) => Some(b),
        _ => None,
    }
}

/// Property values are strings on the wire; one that reads as a number compares as one.
fn property_value(raw: &str) -> Value {
    match raw.trim().parse::<f64>() {
        Ok(n) if n.is_finite() => Value::Num(n),
        _ => match raw {
            "true" | "TRUE" => Value::Bool(true),
            "false" | "FALSE" => Value::Bool(false),
            _ => Value::Str(raw.to_owned()),
        },
    }
}

fn compare(a: &Value, b: &Value) -> Option<std::cmp::Ordering> {
    match (a, b) {
        (Value::Num(x), Value::Num(y)) => x.partial_cmp(y),
        (Value::Str(x), Value::Str(y)) => Some(x.cmp(y)),
        (Value::Bool(x), Value::Bool(y)) => Some(x.cmp(y)),
        // A numeric-looking property compared with a string literal compares as text.
        (Value::Num(x), Value::Str(y)) => Some(format_number(*x).as_str().cmp(y.as_str())),
        (Value::Str(x), Value::Num(y)) => Some(x.as_str().cmp(format_number(*y).as_str())),
        _ => None,
    }
}

fn format_number(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < 1e15 {
        format!("{n:.0}")
    } else {
        n.to_string()
    }
}

mod sql {
    //! A recursive-descent parser. Precedence, loosest first: OR, AND, NOT, predicates.

    use super::{CompareOp, Expr, Value};

    const MAX_DEPTH: usize = 64;
    const MAX_LEN: usize = 4096;

    #[derive(Debug, Clone, PartialEq)]
    enum Token {
        Ident(String),
        Str(String),
        Num(f64),
        Op(&'static str),
        LParen,
        RParen,
        Comma,
    }

    pub(super) fn parse(input: &str) -> Result<Expr, String> {
        if input.len() > MAX_LEN {
            return Err(format!("longer than {MAX_LEN} bytes"));
        }
        let tokens = tokenize(input)?;
        if tokens.is_empty() {
            return Err("is empty".to_owned());
        }
        let mut parser = Parser {
            tokens,
            pos: 0,
            depth: 0,
        };
        let expr = parser.or()?;
        if parser.pos != parser.tokens.len() {
            return Err(format!(
                "unexpected {:?} at token {}",
                parser.tokens[parser.pos],
                parser.pos + 1
            ));
        }
        Ok(expr)
    }

    fn tokenize(input: &str) -> Result<Vec<Token>, String> {
        let chars: Vec<char> = input.chars().collect();
        let mut tokens = Vec::new();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            match c {
                c if c.is_whitespace() => i += 1,
                '(' => {
                    tokens.push(Token::LParen);
                    i += 1;
                }
                ')' => {
                    tokens.push(Token::RParen);
                    i += 1;
                }
                ',' => {
                    tokens.push(Token::Comma);
                    i += 1;
                }
                '=' => {
                    tokens.push(Token::Op("="));
                    i += 1;
                }
                '<' | '>' => {
                    let next = chars.get(i + 1).copied();
                    let op = match (c, next) {
                        ('<', Some('=')) => "<=",
                        ('<', Some('>')) => "<>",
                        ('>', Some('=')) => ">=",
                        ('<', _) => "<",
                        _ => ">",
                    };
                    i += op.len();
                    tokens.push(Token::Op(op));
                }
                '\'' => {
                    let mut s = String::new();
                    i += 1;
                    loop {
                        match chars.get(i) {
                            None => return Err("has an unterminated string".to_owned()),
                            Some('\'') if chars.get(i + 1) == Some(&'\'') => {
                                s.push('\'');
                                i += 2;
                            }
                            Some('\'') => {
                                i += 1;
                                break;
                            }
                            Some(&ch) => {
                                s.push(ch);
                                i += 1;
                            }
                        }
                    }
                    tokens.push(Token::Str(s));
                }
                c if c.is_ascii_digit()
                    || (c == '-' && chars.get(i + 1).is_some_and(char::is_ascii_digit))
                    || c == '.' =>
                {
                    let start = i;
                    i += 1;
                    while i < chars.len()
                        && (chars[i].is_ascii_digit()
                            || chars[i] == '.'
                            || chars[i] == 'e'
                            || chars[i] == 'E')
                    {
                        i += 1;
                    }
                    let text: String = chars[start..i].iter().collect();
                    let n: f64 = text
                        .parse()
                        .map_err(|_| format!("has a bad number {text:?}"))?;
                    tokens.push(Token::Num(n));
                }
                c if c.is_alphabetic() || c == '_' => {
                    let start = i;
                    while i < chars.len()
                        && (chars[i].is_alphanumeric() || matches!(chars[i], '_' | '.' | '-'))
                    {
                        i += 1;
                    }
                    tokens.push(Token::Ident(chars[start..i].iter().collect()));
                }
                other => return Err(format!("has an unexpected character {other:?}")),
            }
        }
        Ok(tokens)
    }

    struct Parser {
        tokens: Vec<Token>,
        pos: usize,
        depth: usize,
    }

    impl Parser {
        fn peek_keyword(&self, keyword: &str) -> bool {
            matches!(self.tokens.get(self.pos), Some(Token::Ident(w)) if w.eq_ignore_ascii_case(keyword))
        }

        fn eat_keyword(&mut self, keyword: &str) -> bool {
            let found = self.peek_keyword(keyword);
            if found {
                self.pos += 1;
            }
            found
        }

        fn expect_keyword(&mut self, keyword: &str) -> Result<(), String> {
            if self.eat_keyword(keyword) {
                Ok(())
            } else {
                Err(format!("expected {keyword} at token {}", self.pos + 1))
            }
        }

        fn expect(&mut self, token: &Token) -> Result<(), String> {
            if self.tokens.get(self.pos) == Some(token) {
                self.pos += 1;
                Ok(())
            } else {
                Err(format!("expected {token:?} at token {}", self.pos + 1))
            }
        }

        fn nested<T>(
            &mut self,
            f: impl FnOnce(&mut Parser) -> Result<T, String>,
        ) -> Result<T, String> {
            self.depth += 1;
            if self.depth > MAX_DEPTH {
                return Err(format!("nests deeper than {MAX_DEPTH}"));
            }
            let result = f(self);
            self.depth -= 1;
            result
        }

        fn or(&mut self) -> Result<Expr, String> {
            self.nested(|p| {
                let mut left = p.and()?;
                while p.eat_keyword("OR") {
                    left = Expr::Or(Box::new(left), Box::new(p.and()?));
                }
                Ok(left)
            })
        }

        fn and(&mut self) -> Result<Expr, String> {
            let mut left = self.not()?;
            while self.eat_keyword("AND") {
                left = Expr::And(Box::new(left), Box::new(self.not()?));
            }
            Ok(left)
        }

        fn not(&mut self) -> Result<Expr, String> {
            if self.eat_keyword("NOT") {
                return self.nested(|p| Ok(Expr::Not(Box::new(p.not()?))));
            }
            self.predicate()
        }

        fn predicate(&mut self) -> Result<Expr, String> {
            if self.tokens.get(self.pos) == Some(&Token::LParen) {
                self.pos += 1;
                let inner = self.or()?;
                self.expect(&Token::RParen)?;
                return Ok(inner);
            }
            let left = self.operand()?;
            if self.eat_keyword("IS") {
                let negated = self.eat_keyword("NOT");
                self.expect_keyword("NULL")?;
                return Ok(Expr::IsNull {
                    value: Box::new(left),
                    negated,
                });
            }
            let negated = self.eat_keyword("NOT");
            if self.eat_keyword("IN") {
                self.expect(&Token::LParen)?;
                let mut list = vec![self.literal()?];
                while self.tokens.get(self.pos) == Some(&Token::Comma) {
                    self.pos += 1;
                    list.push(self.literal()?);
                }
                self.expect(&Token::RParen)?;
                return Ok(Expr::In {
                    value: Box::new(left),
                    list,
                    negated,
                });
            }
            if self.eat_keyword("BETWEEN") {
                let low = self.operand()?;
                self.expect_keyword("AND")?;
                let high = self.operand()?;
                return Ok(Expr::Between {
                    value: Box::new(left),
                    low: Box::new(low),
                    high: Box::new(high),
                    negated,
                });
            }
            if negated {
                return Err(format!(
                    "expected IN or BETWEEN after NOT at token {}",
                    self.pos + 1
                ));
            }
            let op = match self.tokens.get(self.pos) {
                Some(Token::Op(op)) => *op,
                // A bare boolean property or literal: `flag` or `TRUE`.
                _ => return Ok(left),
            };
            self.pos += 1;
            let op = match op {
                "=" => CompareOp::Eq,
                "<>" => CompareOp::Ne,
                "<" => CompareOp::Lt,
                "<=" => CompareOp::Le,
                ">" => CompareOp::Gt,
                _ => CompareOp::Ge,
            };
            let right = self.operand()?;
            Ok(Expr::Compare(Box::new(left), op, Box::new(right)))
        }

        fn operand(&mut self) -> Result<Expr, String> {
            match self.tokens.get(self.pos).cloned() {
                Some(Token::Ident(word)) => {
                    self.pos += 1;
                    Ok(match word.to_ascii_uppercase().as_str() {
                        "TRUE" => Expr::Literal(Value::Bool(true)),
                        "FALSE" => Expr::Literal(Value::Bool(false)),
                        "AND" | "OR" | "NOT" | "IN" | "BETWEEN" | "IS" | "NULL" => {
                            return Err(format!("unexpected keyword {word} at token {}", self.pos));
                        }
                        _ => Expr::Property(word),
                    })
                }
                Some(Token::Str(_) | Token::Num(_)) => Ok(Expr::Literal(self.literal()?)),
                Some(other) => Err(format!("unexpected {other:?} at token {}", self.pos + 1)),
                None => Err("ends too early".to_owned()),
            }
        }

        fn literal(&mut self) -> Result<Value, String> {
            let value = match self.tokens.get(self.pos) {
                Some(Token::Str(s)) => Value::Str(s.clone()),
                Some(Token::Num(n)) => Value::Num(*n),
                Some(Token::Ident(w)) if w.eq_ignore_ascii_case("TRUE") => Value::Bool(true),
                Some(Token::Ident(w)) if w.eq_ignore_ascii_case("FALSE") => Value::Bool(false),
                Some(other) => {
                    return Err(format!(
                        "expected a literal, found {other:?} at token {}",
                        self.pos + 1
                    ));
                }
                None => return Err("ends too early".to_owned()),
            };
            self.pos += 1;
            Ok(value)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrumq_storage::Properties;
    use proptest::prelude::*;

    fn props(pairs: &[(&str, &str)]) -> Properties {
        let mut p = Properties::new();
        for (k, v) in pairs {
            p.push(k, v).unwrap();
        }
        p
    }

    fn sql(expr: &str, pairs: &[(&str, &str)]) -> bool {
        Filter::parse(FilterType::Sql as i32, expr)
            .unwrap()
            .matches(&props(pairs).as_ref())
    }

    #[test]
    fn tag_expressions() {
        let f = Filter::parse(FilterType::Tag as i32, "a || b").unwrap();
        assert!(f.matches(&props(&[("TAGS", "a")]).as_ref()));
        assert!(f.matches(&props(&[("TAGS", "b")]).as_ref()));
        assert!(!f.matches(&props(&[("TAGS", "c")]).as_ref()));
        assert!(!f.matches(&props(&[]).as_ref()));
        assert!(f.may_match(tag_hash("a")) && !f.may_match(tag_hash("c")));
        assert_eq!(
            Filter::parse(FilterType::Tag as i32, "*").unwrap(),
            Filter::All
        );
        assert_eq!(
            Filter::parse(FilterType::Tag as i32, "").unwrap(),
            Filter::All
        );
        assert!(Filter::parse(FilterType::Tag as i32, "a || ").is_err());
        assert_eq!(
            Filter::parse(FilterType::Unspecified as i32, "*").unwrap(),
            Filter::All
        );
        let unknown = Filter::parse(7, "*").unwrap_err();
        assert_eq!(unknown.code, Code::IllegalFilterExpression);
        assert!(unknown.message.contains("filter_expression.type 7"));
    }

    #[test]
    fn sql_comparisons_and_logic() {
        let p = [("a", "5"), ("b", "x"), ("TAGS", "t1")];
        assert!(sql("a > 3", &p));
        assert!(sql("a = 5 AND b = 'x'", &p));
        assert!(!sql("a < 3 OR b <> 'x'", &p));
        assert!(sql("NOT (a < 3)", &p));
        assert!(sql("a BETWEEN 1 AND 5", &p));
        assert!(!sql("a NOT BETWEEN 1 AND 5", &p));
        assert!(sql("b IN ('y', 'x')", &p));
        assert!(sql("b NOT IN ('y')", &p));
        assert!(sql("c IS NULL", &p));
        assert!(sql("a IS NOT NULL", &p));
        assert!(sql("TAGS = 't1'", &p));
        assert!(sql("a >= 5.0 and a <= 5", &p));
    }

    #[test]
    fn sql_unknown_is_not_a_match() {
        // A missing property makes the comparison UNKNOWN; NOT UNKNOWN is still UNKNOWN.
        assert!(!sql("c > 1", &[]));
        assert!(!sql("NOT (c > 1)", &[]));
        assert!(sql("c > 1 OR TRUE", &[]));
    }

    #[test]
    fn sql_errors_name_the_problem() {
        for bad in [
            "", "a >", "a = 'x", "a IN ()", "(a = 1", "a = 1 b", "a NOT 3", "a # 1",
        ] {
            let err = Filter::parse(FilterType::Sql as i32, bad).unwrap_err();
            assert_eq!(err.code, Code::IllegalFilterExpression, "{bad}");
            assert!(err.message.contains("filter_expression"), "{}", err.message);
        }
        let deep = format!("{}a = 1{}", "(".repeat(200), ")".repeat(200));
        assert!(Filter::parse(FilterType::Sql as i32, &deep).is_err());
    }

    proptest! {
        #[test]
        fn the_sql_parser_never_panics(input in "[ a-z0-9'()<>=,.-]{0,60}|(AND|OR|NOT|IN|IS|NULL|BETWEEN| |a|1|'x'|\\(|\\)|=|,){0,30}") {
            if let Ok(filter) = Filter::parse(FilterType::Sql as i32, &input) {
                let _ = filter.matches(&props(&[("a", "1")]).as_ref());
            }
        }
    }
}
