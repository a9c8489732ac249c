//! Property filters (§1.4) as DataFusion expressions, with the spec's null semantics.
//!
//! Positive operators are false when the property is not set; their negations (`neq`,
//! `not_icontains`, `not_regex`, `not_in`) are exact complements and therefore true when it is
//! not set. Equality compares string renderings; numeric operators coerce numbers and numeric
//! strings and ignore everything else.

use crate::query::frame::PropertyColumns;
use crate::query::udf::{ParseDatetime, RenderValue, ToNumber};
use arrow::datatypes::DataType;
use datafusion::functions::expr_fn::{coalesce, lower, regexp_like, strpos};
use datafusion::logical_expr::{Expr, lit};
use datafusion::prelude::cast;
use datafusion::scalar::ScalarValue;
use optiprism_types::query::{
    Filter, FilterOp, PropertySource, json_number, json_render, resolve_date_operand,
};
use std::ops::Not;
use std::sync::Arc;

/// Looks up the columns of a property key.
pub trait ColumnLookup {
    /// The columns of `key`.
    fn property(&self, key: &str) -> PropertyColumns;
    /// "Now" for relative dates, epoch ms.
    fn now_ms(&self) -> i64;
    /// Identity merges and the members of the query's cohort filters.
    fn identities(&self) -> &std::sync::Arc<crate::query::udf::IdentityView>;
    /// The current value of person property `key` of each event's person (rendered).
    fn person_property(&self, key: &str) -> PropertyColumns {
        PropertyColumns {
            computed: Some(
                crate::query::udf::PersonUdf::property(Arc::clone(self.identities()), key)
                    .call(vec![column("person_id")]),
            ),
            ..PropertyColumns::default()
        }
    }
}

fn falsy(e: Expr) -> Expr {
    coalesce(vec![e, lit(false)])
}

fn column(name: &str) -> Expr {
    // Property names may hold dots and `#`: refer to them verbatim.
    Expr::Column(datafusion::common::Column::from_name(name))
}

/// The typed column's value, else the mismatched text's; `none` when the rows have neither.
fn typed_or_text(typed: Option<Expr>, text: Option<Expr>, none: ScalarValue) -> Expr {
    match (typed, text) {
        (Some(t), Some(x)) => coalesce(vec![t, x]),
        (Some(t), None) => t,
        (None, Some(x)) => x,
        (None, None) => lit(none),
    }
}

/// The string rendering of a property (null when not set).
pub fn rendered(cols: &PropertyColumns) -> Expr {
    if let Some(e) = &cols.computed {
        return e.clone();
    }
    let typed = cols.typed.as_ref().map(|(name, ty)| match ty {
        DataType::Utf8 => column(name),
        DataType::Dictionary(_, _) => cast(column(name), DataType::Utf8),
        _ => RenderValue::udf().call(vec![column(name)]),
    });
    let text = cols.text.as_ref().map(|n| column(n));
    typed_or_text(typed, text, ScalarValue::Utf8(None))
}

/// The numeric value of a property (null when not set or not numeric).
fn numeric(cols: &PropertyColumns) -> Expr {
    // `to_number`, not a cast: casts accept `NaN` and `inf`, which are no numbers (§1.3) and
    // would pass every `gt` in Arrow's total order.
    let number = |e: Expr| ToNumber::udf().call(vec![e]);
    if let Some(e) = &cols.computed {
        return number(e.clone());
    }
    let typed = cols.typed.as_ref().and_then(|(name, ty)| match ty {
        DataType::Float64 => Some(number(column(name))),
        DataType::Utf8 | DataType::Dictionary(_, _) => {
            Some(number(cast(column(name), DataType::Utf8)))
        }
        _ => None,
    });
    let text = cols.text.as_ref().map(|n| number(column(n)));
    typed_or_text(typed, text, ScalarValue::Float64(None))
}

/// The instant of a property in epoch ms (datetime properties, or ISO strings).
fn instant_ms(cols: &PropertyColumns) -> Expr {
    if let Some(e) = &cols.computed {
        return ParseDatetime::udf().call(vec![e.clone()]);
    }
    let typed = cols.typed.as_ref().and_then(|(name, ty)| match ty {
        DataType::Timestamp(_, _) => Some(cast(column(name), DataType::Int64)),
        DataType::Utf8 | DataType::Dictionary(_, _) => {
            Some(ParseDatetime::udf().call(vec![cast(column(name), DataType::Utf8)]))
        }
        _ => None,
    });
    let text = cols
        .text
        .as_ref()
        .map(|n| ParseDatetime::udf().call(vec![column(n)]));
    typed_or_text(typed, text, ScalarValue::Int64(None))
}

fn is_set(cols: &PropertyColumns) -> Expr {
    if let Some(e) = &cols.computed {
        return e.clone().is_not_null();
    }
    let typed = cols.typed.as_ref().map(|(n, _)| column(n).is_not_null());
    let text = cols.text.as_ref().map(|n| column(n).is_not_null());
    match (typed, text) {
        (Some(t), Some(x)) => t.or(x),
        (Some(t), None) => t,
        (None, Some(x)) => x,
        (None, None) => lit(false),
    }
}

fn operands(value: &serde_json::Value) -> Vec<&serde_json::Value> {
    match value {
        serde_json::Value::Array(items) => items.iter().collect(),
        other => vec![other],
    }
}

fn equals_any(cols: &PropertyColumns, value: &serde_json::Value) -> Expr {
    let strings: Vec<Expr> = operands(value)
        .into_iter()
        .map(|v| lit(json_render(v)))
        .collect();
    falsy(rendered(cols).in_list(strings, false))
}

/// The expression of a filter (already validated).
pub fn filter_expr(f: &Filter, lookup: &dyn ColumnLookup) -> Expr {
    use FilterOp::*;
    match f.op {
        And => f
            .filters
            .iter()
            .map(|x| filter_expr(x, lookup))
            .reduce(Expr::and)
            .unwrap_or(lit(true)),
        Or => f
            .filters
            .iter()
            .map(|x| filter_expr(x, lookup))
            .reduce(Expr::or)
            .unwrap_or(lit(false)),
        InCohort | NotInCohort => {
            let member = crate::query::udf::PersonUdf::segment(Arc::clone(lookup.identities()), f)
                .call(vec![column("person_id")]);
            if f.op == InCohort {
                member
            } else {
                member.not()
            }
        }
        _ => {
            let key = f.key.as_deref().unwrap_or_default();
            let cols = match f.source {
                PropertySource::Event => lookup.property(key),
                PropertySource::Person => lookup.person_property(key),
            };
            let value = f.value.clone().unwrap_or(serde_json::Value::Null);
            match f.op {
                Eq | In => equals_any(&cols, &value),
                Neq | NotIn => equals_any(&cols, &value).not(),
                Icontains => {
                    let needle = lit(json_render(&value).to_lowercase());
                    falsy(strpos(lower(rendered(&cols)), needle).gt(lit(0i32)))
                }
                NotIcontains => {
                    let needle = lit(json_render(&value).to_lowercase());
                    falsy(strpos(lower(rendered(&cols)), needle).gt(lit(0i32))).not()
                }
                Regex => falsy(regexp_like(rendered(&cols), lit(json_render(&value)), None)),
                NotRegex => {
                    falsy(regexp_like(rendered(&cols), lit(json_render(&value)), None)).not()
                }
                Gt | Gte | Lt | Lte => {
                    let n = lit(json_number(&value).unwrap_or(f64::NAN));
                    let x = numeric(&cols);
                    falsy(match f.op {
                        Gt => x.gt(n),
                        Gte => x.gt_eq(n),
                        Lt => x.lt(n),
                        _ => x.lt_eq(n),
                    })
                }
                IsSet => is_set(&cols),
                IsNotSet => is_set(&cols).not(),
                IsDateBefore | IsDateAfter | IsDateExact => {
                    let text = value.as_str().unwrap_or_default();
                    let at = resolve_date_operand(text, lookup.now_ms()).unwrap_or(i64::MIN);
                    let x = instant_ms(&cols);
                    falsy(match f.op {
                        IsDateBefore => x.lt(lit(at)),
                        IsDateAfter => x.gt(lit(at)),
                        // A bare date means that whole (UTC) day.
                        _ if text.len() == 10 => {
                            x.clone().gt_eq(lit(at)).and(x.lt(lit(at + 86_400_000)))
                        }
                        _ => x.eq(lit(at)),
                    })
                }
                And | Or | InCohort | NotInCohort => unreachable!("handled above"),
            }
        }
    }
}

/// The conjunction of filters.
pub fn all_of(filters: &[Filter], lookup: &dyn ColumnLookup) -> Option<Expr> {
    filters
        .iter()
        .map(|f| filter_expr(f, lookup))
        .reduce(Expr::and)
}

/// A column reference by exact name.
pub fn named(name: &str) -> Expr {
    column(name)
}

/// The event property keys `filters` read (nested groups included; person properties and
/// cohorts are not columns of the rows).
pub fn referenced_keys(filters: &[Filter], out: &mut Vec<String>) {
    for f in filters {
        if let Some(k) = &f.key
            && f.source == PropertySource::Event
        {
            out.push(k.clone());
        }
        referenced_keys(&f.filters, out);
    }
}
