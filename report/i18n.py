"""Every string the reports show, in Japanese and English, and locale-aware number formats.

Strings are ``str.format`` templates keyed by name; :class:`Messages` looks them up for one
language and fails loudly on a missing key or language, so a new string cannot silently show up
in only one language (tests render both).
"""
from __future__ import annotations

import datetime as dt
import math

LANGUAGES = ("ja", "en")

CATALOGUE: dict[str, dict[str, str]] = {
    # -- report frame -----------------------------------------------------------------------
    "diag.title": {"ja": "顧客価値診断レポート", "en": "Customer value diagnostic report"},
    "weekly.title": {"ja": "週次 顧客動向レポート", "en": "Weekly customer trend report"},
    "subtitle": {"ja": "{client} ／ 基準日 {as_of} ／ 作成 {generated}",
                 "en": "{client} · as of {as_of} · generated {generated}"},
    "missing": {"ja": "データなし：テーブル {tables} がまだありません。`{command}` で作成されます。",
                "en": "No data yet: table {tables} does not exist. `{command}` produces it."},
    "empty": {"ja": "該当するデータがありません（{what}）。", "en": "No rows to show ({what})."},
    "toc": {"ja": "目次", "en": "Contents"},
    # -- sections ---------------------------------------------------------------------------
    "sec.summary": {"ja": "1. サマリー", "en": "1. Summary"},
    "sec.retention": {"ja": "2. 継続力（リテンション）", "en": "2. Retention power"},
    "sec.purchasing": {"ja": "3. 購買力", "en": "3. Purchasing power"},
    "sec.profitability": {"ja": "4. 収益性", "en": "4. Profitability"},
    "sec.trends": {"ja": "5. 5年トレンド", "en": "5. Five-year trends"},
    "sec.models": {"ja": "6. モデル比較", "en": "6. Model comparison"},
    "sec.generations": {"ja": "7. セグメント世代", "en": "7. Segment generations"},
    "sec.method": {"ja": "8. 方法と定義", "en": "8. Method notes"},
    "sec.findings": {"ja": "主な発見", "en": "Headline findings"},
    "sec.kpis": {"ja": "主要指標", "en": "Key figures"},
    "sec.segments": {"ja": "セグメント概要", "en": "Segments at a glance"},
    "seg.col.segment": {"ja": "セグメント", "en": "Segment"},
    "seg.col.customers": {"ja": "顧客数", "en": "Customers"},
    "seg.col.customer_share": {"ja": "顧客構成比", "en": "Share of customers"},
    "seg.col.value": {"ja": "予測純売上（6か月）", "en": "Predicted net, 6 months"},
    "seg.col.value_share": {"ja": "売上構成比", "en": "Share of revenue"},
    "seg.col.mean": {"ja": "1人あたり", "en": "Per customer"},
    "seg.col.interval": {"ja": "予測純売上の80%区間", "en": "80% interval of the total"},
    "interval": {"ja": "{low}～{high}", "en": "{low} – {high}"},
    # -- KPIs -------------------------------------------------------------------------------
    "kpi.metric": {"ja": "指標", "en": "Metric"},
    "kpi.value": {"ja": "値", "en": "Value"},
    "kpi.customers": {"ja": "顧客数（基準日までに購入あり）", "en": "Customers (ordered on or before the as-of date)"},
    "kpi.active_12m": {"ja": "稼働顧客数（直近12か月に購入あり）", "en": "Active customers (ordered in the last 12 months)"},
    "kpi.new_12m": {"ja": "新規顧客数（初回購入が直近12か月）", "en": "New customers (first order in the last 12 months)"},
    "kpi.repeat_rate": {"ja": "リピート率（購入日が2日以上）", "en": "Repeat rate (two or more purchase days)"},
    "kpi.gross_total": {"ja": "累計売上 キャンセル前（基準日まで）", "en": "Revenue before cancellations (to date)"},
    "kpi.cancelled_total": {"ja": "累計キャンセル額（基準日まで）", "en": "Cancelled (to date)"},
    "kpi.net_total": {"ja": "累計純売上（基準日まで）", "en": "Net revenue (to date)"},
    "kpi.net_12m": {"ja": "純売上（直近12か月）", "en": "Net revenue (last 12 months)"},
    "kpi.predicted": {"ja": "今後6か月の予測純売上（全顧客）", "en": "Predicted net revenue, next 6 months (all customers)"},
    # -- findings ---------------------------------------------------------------------------
    "find.segment_shift": {
        "ja": "前の世代からの最大の移動は「{src}」→「{dst}」の{n}（移動元の{share}）です。",
        "en": "The largest segment shift since the previous generation is {src} → {dst}: {n} ({share} of {src})."},
    "find.best_channel": {
        "ja": "直近12か月の新規顧客1人あたり予測6か月価値が最も高い獲得チャネルは「{best}」（{best_value}）で、"
              "最も低い「{worst}」（{worst_value}）の{ratio}倍です。",
        "en": "Among customers acquired in the last 12 months, {best} brings the highest predicted 6-month value "
              "per new customer ({best_value}), {ratio} times that of {worst} ({worst_value})."},
    "find.f2_trend": {
        "ja": "F2転換率（初回購入から90日以内の2回目購入）は直近6か月のコホートで{recent}と、その前の6か月の{previous}から{direction}。",
        "en": "F2 conversion (a second purchase within 90 days) was {recent} for the latest six monthly cohorts, "
              "{direction} from {previous} for the six before."},
    "find.up": {"ja": "上昇しました", "en": "up"},
    "find.down": {"ja": "低下しました", "en": "down"},
    "find.flat": {"ja": "ほぼ横ばいです", "en": "about flat"},
    "find.concentration": {
        "ja": "予測価値の上位20%の顧客が、今後6か月の予測純売上の{share}を占めます。",
        "en": "The top 20% of customers by predicted value hold {share} of the predicted net revenue of the next six months."},
    # the verb follows the ratio: "only" when customers who cancel are worth less, "reaches" when more
    "find.cancel_effect.lower": {
        "ja": "キャンセル率（金額）20%以上の顧客は{share}で、1人あたり予測6か月価値は{high}と、キャンセル率5%未満の顧客（{low}）の{ratio}倍にとどまります。",
        "en": "{share} of customers cancel 20% or more of their order value; their predicted 6-month value is {high} "
              "per customer, only {ratio} times that of customers cancelling under 5% ({low})."},
    "find.cancel_effect.higher": {
        "ja": "キャンセル率（金額）20%以上の顧客は{share}で、1人あたり予測6か月価値は{high}と、キャンセル率5%未満の顧客（{low}）の{ratio}倍に達します。",
        "en": "{share} of customers cancel 20% or more of their order value; their predicted 6-month value is {high} "
              "per customer, {ratio} times that of customers cancelling under 5% ({low})."},
    # -- retention --------------------------------------------------------------------------
    "ret.intro": {"ja": "リピート率 {repeat_rate}（{repeat}／{customers}）。2回目の購入に進んだ顧客の初回から2回目までの日数の中央値は{median_days}日です。",
                  "en": "Repeat rate {repeat_rate} ({repeat} of {customers}). Customers who came back took a median of {median_days} days from the first to the second purchase."},
    "ret.f2.title": {"ja": "獲得月コホート別 F2転換率（90日以内）", "en": "F2 conversion within 90 days by first-order month"},
    "ret.f2.x": {"ja": "初回購入月", "en": "First-order month"},
    "ret.f2.y": {"ja": "F2転換率（%）", "en": "F2 conversion (%)"},
    "ret.f2.aid": {"ja": "棒が高いほど新規顧客が早く2回目の購入に進んでいます。初回から90日たっていないコホートは未確定のため除外しています。",
                   "en": "Higher bars: new customers come back sooner. Cohorts younger than 90 days are left out (not complete yet)."},
    "ret.heat.title": {"ja": "コホート別 継続率（初回購入からの経過月）", "en": "Cohort retention by months since first order"},
    "ret.heat.x": {"ja": "初回購入からの経過月（か月）", "en": "Months since first order"},
    "ret.heat.y": {"ja": "初回購入月", "en": "First-order month"},
    "ret.heat.aid": {"ja": "色が濃いほど、その月にも購入した顧客の割合（%）が高いことを示します。",
                     "en": "Darker cells: a larger share (%) of the cohort bought again in that month."},
    "ret.gap.title": {"ja": "購入間隔の分布（リピート顧客）", "en": "Gaps between purchases (repeat customers)"},
    "ret.gap.x": {"ja": "平均購入間隔（日）", "en": "Mean gap between purchase days (days)"},
    "ret.gap.y": {"ja": "顧客数（人）", "en": "Customers"},
    "ret.gap.aid": {"ja": "中央値は{median}日。右端の棒は{cap}日以上をまとめています。間隔の長い顧客は休眠予備軍です。",
                    "en": "Median {median} days; the last bar gathers {cap} days and more. Long gaps mark customers at risk of lapsing."},
    # -- purchasing -------------------------------------------------------------------------
    "pur.aov.title": {"ja": "平均注文単価の分布", "en": "Average order value"},
    "pur.aov.x": {"ja": "平均注文単価（{unit}）", "en": "Average order value ({unit})"},
    "pur.aov.aid": {"ja": "中央値は{median}。右端の棒は{cap}以上をまとめています。",
                    "en": "Median {median}; the last bar gathers {cap} and more."},
    "pur.cancel.title": {"ja": "キャンセル率（金額ベース）の分布", "en": "Cancellation rate by amount"},
    "pur.cancel.x": {"ja": "キャンセル率（%）", "en": "Cancellation rate (%)"},
    "pur.cancel.aid": {"ja": "顧客の{zero}はキャンセルが一度もありません。",
                       "en": "{zero} of customers never cancelled."},
    "pur.band.title": {"ja": "キャンセル率帯別 1人あたり予測6か月価値", "en": "Predicted 6-month value per customer by cancellation band"},
    "pur.band.x": {"ja": "キャンセル率（金額ベース）", "en": "Cancellation rate (by amount)"},
    "pur.band.y": {"ja": "1人あたり予測価値（{unit}）", "en": "Predicted value per customer ({unit})"},
    "pur.band.gross": {"ja": "キャンセル前", "en": "Before cancellations"},
    "pur.band.net": {"ja": "純価値", "en": "Net"},
    "pur.band.aid": {"ja": "キャンセル前と純価値の差が、キャンセルで失われる見込み額です。",
                     "en": "The gap between the bars is the value expected to be lost to cancellations."},
    "pur.seg.title": {"ja": "セグメント別 1人あたり予測6か月価値", "en": "Predicted 6-month value per customer by segment"},
    "pur.seg.x": {"ja": "セグメント", "en": "Segment"},
    "pur.seg.aid": {"ja": "棒の上の数字はセグメントの顧客数です。", "en": "Numbers above the bars: customers in the segment."},
    "axis.customers": {"ja": "顧客数（人）", "en": "Customers"},
    # -- profitability ----------------------------------------------------------------------
    "pro.dist.title": {"ja": "予測6か月純価値の分布", "en": "Predicted 6-month net value"},
    "pro.dist.x": {"ja": "予測6か月純価値（{unit}）", "en": "Predicted 6-month net value ({unit})"},
    "pro.dist.aid": {"ja": "中央値{median}に対し平均{mean}：少数の高価値顧客が平均を押し上げています。右端の棒は{cap}以上。",
                     "en": "Median {median} against a mean of {mean}: a few high-value customers lift the mean. The last bar gathers {cap} and more."},
    "pro.pareto.title": {"ja": "顧客構成比と予測売上構成比（パレート図）", "en": "Share of customers vs share of predicted revenue (Pareto)"},
    "pro.pareto.x.decile": {"ja": "予測価値の十分位（1＝最上位10%）", "en": "Predicted-value decile (1 = top 10%)"},
    "pro.pareto.x.segment": {"ja": "セグメント（予測価値の高い順）", "en": "Segment (highest value first)"},
    "pro.pareto.y": {"ja": "構成比（%）", "en": "Share (%)"},
    "pro.pareto.customers": {"ja": "顧客数の構成比", "en": "Share of customers"},
    "pro.pareto.value": {"ja": "予測純売上の構成比", "en": "Share of predicted net revenue"},
    "pro.pareto.cum": {"ja": "予測純売上の累積", "en": "Cumulative share of revenue"},
    "pro.pareto.aid": {"ja": "最上位の{group}（顧客の{cust}）が予測純売上の{value}を生みます。",
                       "en": "The top group, {group} ({cust} of customers), brings {value} of the predicted net revenue."},
    "pro.channel.title": {"ja": "獲得チャネル別 新規顧客1人あたり予測6か月価値", "en": "Predicted 6-month value per new customer by acquisition channel"},
    "pro.channel.y": {"ja": "獲得チャネル", "en": "Acquisition channel"},
    "pro.category.title": {"ja": "初回購入カテゴリ別 新規顧客1人あたり予測6か月価値", "en": "Predicted 6-month value per new customer by first product category"},
    "pro.category.y": {"ja": "初回購入カテゴリ", "en": "First product category"},
    "pro.per_new.x": {"ja": "1人あたり予測6か月純価値（{unit}）", "en": "Predicted 6-month net value per customer ({unit})"},
    "pro.per_new.aid": {"ja": "対象は初回購入が直近12か月の新規顧客{n}（チャネル・カテゴリとも初回注文のもの）。棒の右は顧客数。",
                        "en": "Customers whose first order was in the last 12 months ({n}; channel and category of the first order); counts at the right of the bars."},
    "unknown": {"ja": "（不明）", "en": "(unknown)"},
    # -- LTV by acquisition media (ltv_by_channel) ------------------------------------------
    "sec.channel_value": {"ja": "4-2. 獲得媒体別 LTV", "en": "4b. LTV by acquisition media"},
    "cv.intro": {"ja": "基準日に予測した今後6か月の純売上を、初回購入の獲得チャネル別に合計しました。"
                       "80%区間は合計値の区間です。顧客ごとの区間の和よりずっと狭くなりますが、"
                       "全顧客が共有するモデルのパラメータによる不確かさは、顧客をまとめても平均化されません。",
                 "en": "Predicted net revenue of the next six months as of the as-of date, added up by the channel of "
                       "each customer's first order. The 80% interval is that of the total: far narrower than the "
                       "customers' own intervals added up, though the part from the shared model parameters does "
                       "not average out over customers."},
    "cv.col.interval": {"ja": "80%区間", "en": "80% interval"},
    "cv.chart.title": {"ja": "獲得チャネル別 予測6か月純売上と80%区間", "en": "Predicted 6-month net revenue by acquisition channel, with 80% intervals"},
    "cv.chart.x": {"ja": "予測6か月純売上（{unit}）", "en": "Predicted 6-month net revenue ({unit})"},
    "cv.chart.aid": {"ja": "線は合計の80%区間、棒の右は顧客数。F2転換率は90日が経過した獲得月の顧客のみで計算しています。",
                     "en": "Whiskers: the total's 80% interval; counts at the right. F2 counts only customers "
                           "acquired in months that have had 90 days by the as-of date."},
    # -- trends -----------------------------------------------------------------------------
    "tr.cust.title": {"ja": "年別 新規顧客と既存顧客", "en": "New and existing customers per year"},
    "tr.cust.x": {"ja": "年", "en": "Year"},
    "tr.cust.aid": {"ja": "新規は初回購入がその年の顧客、既存はそれ以前からの顧客でその年に購入した人です。",
                    "en": "New: first order in that year; existing: earlier customers who bought in that year."},
    "tr.rev.title": {"ja": "年別 純売上（新規・既存）", "en": "Net revenue per year (new and existing customers)"},
    "tr.rev.y": {"ja": "純売上（{unit}）", "en": "Net revenue ({unit})"},
    "tr.rev.aid": {"ja": "既存顧客の売上が全体に占める割合が、継続力の強さを表します。",
                   "en": "The share of revenue from existing customers shows how much the business lives on repeat buying."},
    "tr.partial": {"ja": "＊は基準日までの途中の年です。", "en": " * marks a year counted up to the as-of date only."},
    "tr.new": {"ja": "新規", "en": "New"},
    "tr.existing": {"ja": "既存", "en": "Existing"},
    "sec.channels": {"ja": "5-2. ソース横断の顧客 (EC・店舗)", "en": "5b. Customers across sources (EC, store)"},
    "ch.sets.title": {"ja": "初回購入年別 顧客数 (購入したソースの組み合わせ)",
                      "en": "Customers by year of first order and the sources they bought from"},
    "ch.sets.aid": {"ja": "同じ顧客を全ソースで一人として数えています。「+」は複数ソースで購入した顧客です。",
                    "en": "Each customer is counted once across all sources; \"+\" marks customers who bought "
                          "from several sources."},
    "ch.col.set": {"ja": "購入ソース", "en": "Sources bought from"},
    "ch.col.first": {"ja": "初回購入ソース", "en": "First order from"},
    "ch.col.customers": {"ja": "顧客数", "en": "Customers"},
    "ch.col.f2": {"ja": "F2転換率 (90日)", "en": "F2 within 90 days"},
    "ch.col.value": {"ja": "初回から6か月の純売上/人", "en": "Net in first 6 months per customer"},
    "ch.col.crossed": {"ja": "他ソースでも購入", "en": "Later bought from another source"},
    "ch.crossed.aid": {"ja": "初回購入ソース別に、その後ほかのソースでも購入した顧客の割合です (店舗から EC への移行など)。",
                       "en": "Per source of the first order, the share of customers who later bought from another "
                             "source too (store members who start buying online, and the reverse)."},
    "tr.cat.title": {"ja": "年別・商品カテゴリ別 純売上", "en": "Net revenue per year by product category"},
    "tr.cat.aid": {"ja": "カテゴリごとの伸びと縮みを比べます。", "en": "Compare which categories grow and which shrink."},
    "tr.week.title": {"ja": "直近26週 セグメント別 週次純売上", "en": "Weekly net revenue per segment, last 26 weeks"},
    "tr.week.x": {"ja": "週（週の開始日）", "en": "Week (start date)"},
    "tr.week.y": {"ja": "週次純売上（{unit}）", "en": "Weekly net revenue ({unit})"},
    "tr.week.aid": {"ja": "線が下がり続けるセグメントは、次の世代で顧客が下位に移るおそれがあります。",
                    "en": "A segment whose line keeps falling is likely to lose customers to lower segments at the next generation."},
    # -- models -----------------------------------------------------------------------------
    # quarantine reason codes (pipelines/validation.py) and value models (models/bundle.py), by name
    "reason.malformed_row": {"ja": "列数がヘッダーと不一致", "en": "not the header's number of fields"},
    "reason.missing_order_id": {"ja": "受注番号が空", "en": "order id empty"},
    "reason.missing_customer_id": {"ja": "顧客IDが空", "en": "customer id empty"},
    "reason.unparsable_timestamp": {"ja": "日時を解釈できない", "en": "timestamp not understood"},
    "reason.future_timestamp": {"ja": "読込日より先の日付（当日に再読込）", "en": "dated after the day read (read again then)"},
    "reason.missing_amount": {"ja": "金額が空", "en": "amount empty"},
    "reason.non_numeric_amount": {"ja": "金額が数値でない", "en": "amount not a number"},
    "reason.negative_amount": {"ja": "キャンセル行以外の負の金額", "en": "negative amount on an order row"},
    "reason.unknown_currency": {"ja": "対象外の通貨", "en": "currency not allowed"},
    "reason.duplicate_order_conflict": {"ja": "同じ受注番号で内容が異なる行", "en": "one order id, differing rows"},
    "reason.cancellation_without_order": {"ja": "対応する受注のないキャンセル行", "en": "cancellation line without its order"},
    "vm.btyd": {"ja": "BTYDモデル（購入回数×注文単価×(1−キャンセル率)）",
                "en": "BTYD (expected purchases × order value × (1 − cancellation rate))"},
    "vm.cohort": {"ja": "コホート実績法", "en": "empirical cohort method"},
    "vm.naive": {"ja": "前期実績の繰り越し", "en": "last period carried forward"},
    "vm.hybrid": {"ja": "ハイブリッド（BTYDの予測と購買行動を学習した勾配ブースティング木）",
                  "en": "hybrid (gradient-boosted trees on the BTYD forecast and buying behaviour)"},
    # -- the hybrid's explanation (report/diagnostic.py: hybrid_block) ------------------
    "hyb.title": {"ja": "ハイブリッドモデルが重視している項目", "en": "What the hybrid model relies on"},
    "hyb.lead": {"ja": "チャンピオンのハイブリッドモデルは、{train}時点の顧客{rows}人の情報と、その後6か月の実際の購入額から学習しています。"
                       "下の表は、項目の値を顧客間でシャッフルしたときに予測誤差（1人あたりの平均絶対誤差）がどれだけ増えるかを、"
                       "バックテストの検証期間で測ったものです。増えるほど予測がその項目に頼っています。",
                 "en": "The champion hybrid learned from {rows} customers as they stood on {train} and what they actually "
                       "spent in the six months after. The table shows, on the backtest's holdout, how much the "
                       "prediction error (mean absolute error per customer) grows when an item is shuffled between "
                       "customers: the more it grows, the more the predictions rely on that item."},
    "hyb.col.rank": {"ja": "順位", "en": "Rank"},
    "hyb.col.feature": {"ja": "項目", "en": "Item"},
    "hyb.col.importance": {"ja": "誤差の増加（1人あたり）", "en": "Error increase per customer"},
    "hyb.col.gain": {"ja": "学習での利用割合", "en": "Share of the trees' splits"},
    "hyb.base": {"ja": "木が読むBTYDモデルは「{model}」で、パラメータは {params} です（BTYDの予測値・生存確率・期待購入回数・期待単価を入力として使います）。",
                 "en": "The trees read the BTYD model {model}, with parameters {params} (its forecast, p(alive), "
                       "expected purchases and expected order value are inputs)."},
    "hyb.aid": {"ja": "誤差の増加が0に近い項目は、予測にほとんど影響していません。",
                "en": "Items whose error increase is near zero barely affect the predictions."},
    "hyb.f.btyd_net_value": {"ja": "BTYDの6か月予測価値", "en": "BTYD 6-month value forecast"},
    "hyb.f.btyd_expected_purchases": {"ja": "BTYDの期待購入回数", "en": "BTYD expected purchases"},
    "hyb.f.btyd_p_alive": {"ja": "BTYDの生存確率", "en": "BTYD probability still active"},
    "hyb.f.btyd_order_value": {"ja": "BTYDの期待注文単価", "en": "BTYD expected order value"},
    "hyb.f.predicted_cancel_rate": {"ja": "予測キャンセル率", "en": "predicted cancellation rate"},
    "hyb.f.days_since_last": {"ja": "最終購入からの日数", "en": "days since the last purchase"},
    "hyb.f.purchase_days": {"ja": "購入日数（累計）", "en": "purchase days so far"},
    "hyb.f.monetary_value": {"ja": "リピート購入の平均額", "en": "mean repeat purchase value"},
    "hyb.f.avg_order_value": {"ja": "平均注文単価", "en": "average order value"},
    "hyb.f.cancel_rate_count": {"ja": "キャンセル率（件数）", "en": "cancellation rate (orders)"},
    "hyb.f.cancel_rate_amount": {"ja": "キャンセル率（金額）", "en": "cancellation rate (amount)"},
    "hyb.f.gap_mean_days": {"ja": "購入間隔の平均", "en": "mean gap between purchases"},
    "hyb.f.gap_std_days": {"ja": "購入間隔のばらつき", "en": "spread of the gaps between purchases"},
    "hyb.f.orders_3m": {"ja": "直近3か月の注文数", "en": "orders in the last 3 months"},
    "hyb.f.net_3m": {"ja": "直近3か月の純売上", "en": "net spend in the last 3 months"},
    "hyb.f.orders_6m": {"ja": "直近6か月の注文数", "en": "orders in the last 6 months"},
    "hyb.f.net_6m": {"ja": "直近6か月の純売上", "en": "net spend in the last 6 months"},
    "hyb.f.acquisition_channel": {"ja": "獲得媒体", "en": "acquisition channel"},
    "hyb.f.first_category": {"ja": "初回購入カテゴリ", "en": "first order's category"},
    "mod.champion": {"ja": "現在のスコアは「{model}」（モデルバージョン {version}）で計算されています。",
                     "en": "Current scores come from {model} (model version {version})."},
    "mod.why": {"ja": "チャンピオンは選定指標「{metric}」が最も良い「{model}」（{value}）です。",
                "en": "The champion is {model}: it has the best {metric} ({value})."},
    "mod.why.ranking": {"ja": "セグメントは予測値の順位（分位）で区切るため、顧客を今後の購買額の順に最もよく並べるモデルを選んでいます。"
                              "合計額がどこまで正確かは下の表の「合計の誤差率」をご覧ください。",
                        "en": "Segments are cut by rank (quantile bands), so the champion is the model that best orders "
                              "customers by what they will spend; how exact its totals are is the total error in the table below."},
    "mod.table.model": {"ja": "モデル", "en": "Model"},
    "mod.m.mae": {"ja": "MAE（平均絶対誤差）", "en": "MAE"},
    "mod.m.rmse": {"ja": "RMSE", "en": "RMSE"},
    "mod.m.abs_total_error_pct": {"ja": "合計の誤差率", "en": "Total error"},
    "mod.m.spearman": {"ja": "順位相関", "en": "Spearman"},
    "mod.m.normalized_gini": {"ja": "Gini係数", "en": "Gini"},
    "mod.m.top_decile_capture": {"ja": "上位10%捕捉率", "en": "Top 10% capture"},
    "mod.m.top20_capture": {"ja": "上位20%捕捉率", "en": "Top 20% capture"},
    "mod.m.interval_coverage": {"ja": "80%区間の的中率", "en": "80% interval coverage"},
    "mod.metrics.aid": {"ja": "誤差（MAE・RMSE・合計の誤差率）は小さいほど、順位相関・Gini・捕捉率は大きいほど良いモデルです。★がチャンピオン。"
                              "80%区間の的中率は、顧客ごとの6か月価値の予測区間（P10〜P90）に実績が入った顧客の割合で、80%前後なら区間の幅は適切です"
                              "（実績0円は予測された「0円の確率」のうち区間に入る割合で数えます。コホート実績法・前期実績の繰り越しには区間がありません）。",
                        "en": "Errors (MAE, RMSE, total error) are better when smaller; rank correlation, Gini and capture when larger. ★ marks the champion. "
                              "80% interval coverage: the share of customers whose actual 6-month value fell inside their predicted P10-P90 range; "
                              "near 80% means the ranges are as wide as they should be (an actual 0 counts as the part of the predicted chance of 0 "
                              "that lies inside the range). The cohort method and the naive baseline have no ranges."},
    "mod.cal.title": {"ja": "十分位別 予測と実績（バックテスト）", "en": "Predicted vs actual by decile (backtest)"},
    "mod.cal.x": {"ja": "予測価値の十分位（1＝最上位）", "en": "Predicted-value decile (1 = top)"},
    "mod.cal.y": {"ja": "1人あたり6か月純売上（{unit}）", "en": "6-month net revenue per customer ({unit})"},
    "mod.cal.actual": {"ja": "実績", "en": "Actual"},
    "mod.cal.aid": {"ja": "棒は★チャンピオンの十分位ごとの実績（各モデルの点は自分の十分位の予測）。点が棒に近いほど予測は正確です。",
                    "en": "Bars: actual revenue per decile of the champion (★); markers: each model's prediction for its own deciles. Closer to the bars is better."},
    # -- generations ------------------------------------------------------------------------
    "gen.second": {"ja": "{tables} は2つ目のセグメント世代の切替時（最初の世代から segments.generation_months か月後の "
                         "`cvseg segments` / `cvseg run`）に作られます。まだ1世代目です（セグメントが未作成なら `cvseg segments` を先に実行）。",
                   "en": "{tables} are written when the second segment generation is cut (segments.generation_months "
                         "after the first, by `cvseg segments` / `cvseg run`); this warehouse is still in its first "
                         "generation (or has no segments yet: run `cvseg segments` first)."},
    "gen.matrix.title": {"ja": "セグメント移動マトリクス（前世代→今世代）", "en": "Segment migration (previous → current generation)"},
    "gen.matrix.x": {"ja": "今世代のセグメント", "en": "Current segment"},
    "gen.matrix.y": {"ja": "前世代のセグメント", "en": "Previous segment"},
    "gen.matrix.aid": {"ja": "マス目の数字は顧客数。対角線上は同じセグメントにとどまった顧客です。",
                       "en": "Cells show customers; the diagonal holds those who kept their segment."},
    "gen.review.title": {"ja": "前世代の予測と実績（セグメント別純売上）", "en": "Last finished generation: predicted vs actual net revenue by segment"},
    "gen.review.y": {"ja": "6か月純売上（{unit}）", "en": "6-month net revenue ({unit})"},
    "gen.review.pred": {"ja": "予測", "en": "Predicted"},
    "gen.review.actual": {"ja": "実績", "en": "Actual"},
    "gen.review.aid": {"ja": "世代 {generation}：予測合計{pred}に対し実績{actual}。",
                       "en": "Generation {generation}: {pred} predicted against {actual} actual."},
    # -- method -----------------------------------------------------------------------------
    "met.asof": {"ja": "基準日：{as_of}（この日より後の注文は特徴量に使っていません）。",
                 "en": "As-of date: {as_of} (no order after it is used in the features)."},
    "met.range": {"ja": "データ範囲：{first} 〜 {last}、受注{orders}件（基準日までの全注文、キャンセルを含む）。",
                  "en": "Data range: {first} to {last}, {orders} orders up to the as-of date (cancelled ones included)."},
    "met.ingest": {"ja": "取込：{runs}回、入力{input}行のうち受理{accepted}行、隔離{quarantined}行、完全重複{dups}行。",
                   "en": "Ingest: {runs} run(s), {input} input rows: {accepted} accepted, {quarantined} quarantined, {dups} exact duplicates."},
    "met.quarantine": {"ja": "隔離理由別の行数（orders_quarantine）", "en": "Quarantined rows by reason (orders_quarantine)"},
    "met.reason": {"ja": "理由", "en": "Reason"},
    "met.rows": {"ja": "行数", "en": "Rows"},
    "met.none": {"ja": "隔離された行はありません。", "en": "No row was quarantined."},
    "met.defs": {"ja": "指標の定義", "en": "Definitions"},
    "met.basis.gross": {"ja": "購入基準：総注文（gross）。キャンセルされた注文も購入として数え（購入意欲のしるし）、予測額からキャンセル見込みを差し引いています。",
                        "en": "Purchase basis: gross. Cancelled orders count as purchases (a sign of life) and the predicted value is net of expected cancellations."},
    "met.basis.net": {"ja": "購入基準：完了注文のみ（net）。キャンセルされた注文は購入に数えません（ノイズとして扱う）。キャンセルのみの顧客{by_rule}人はモデルで評価せず、ルールで配置しています。",
                      "en": "Purchase basis: net (completed orders only). Cancelled orders are not counted as purchases (treated as noise); {by_rule} customer(s) who only cancelled get no model score and are placed by rule."},
    # how the scores' basis came about (models.purchase_basis and the latest backtest)
    "met.basis.how.none": {"ja": "基準を比べたバックテストはまだありません。models.purchase_basis が auto のとき、`cvseg backtest` が両基準を比べるまでは gross を使います（gross / net を指定して固定もできます）。",
                           "en": "No backtest has compared the two bases yet: under models.purchase_basis: auto the scores use gross until `cvseg backtest` has compared them (or set gross or net to fix it)."},
    "met.basis.how.compared": {"ja": "最新のバックテスト（基準日 {origin}）が{metric}で{other}基準と比べ、チャンピオンはこの基準です（models.purchase_basis: auto はこれに従います）。",
                               "en": "The latest backtest (origin {origin}) compared it with the {other} basis on {metric}, and its champion is on this basis (what models.purchase_basis: auto follows)."},
    "met.basis.how.differs": {"ja": "最新のバックテストのチャンピオンは{champion}基準です。このスコアの基準は models.purchase_basis の指定によるもの、またはそのバックテストより前のものです。",
                              "en": "The latest backtest's champion is on the {champion} basis: these scores' basis is the one models.purchase_basis names, or they predate that backtest."},
    "met.basis.how.set": {"ja": "最新のバックテストはこの基準のみで実行されました（models.purchase_basis の指定）。",
                          "en": "The latest backtest ran this basis only (the one models.purchase_basis names)."},
    "def.ltv": {"ja": "予測6か月純価値：基準日から6か月間に見込まれる売上（キャンセル見込みを差し引いた額）。購入回数をBG/NBD系モデル、注文単価をGamma-Gammaモデル、キャンセル率をベータ二項モデルで推定。",
                "en": "Predicted 6-month net value: revenue a customer is expected to bring in the 6 months after the as-of date, net of expected cancellations (purchases: BG/NBD family, order value: Gamma-Gamma, cancellation rate: beta-binomial)."},
    "def.p_alive": {"ja": "稼働確率（p_alive）：購入履歴から見て、顧客がまだ離脱していない確率。",
                    "en": "p_alive: the probability, given the purchase history, that the customer has not lapsed."},
    "def.repeat": {"ja": "リピート率：購入日が2日以上ある顧客の割合（同じ日の注文は1回の購入）。",
                   "en": "Repeat rate: share of customers with two or more purchase days (orders on one day count once)."},
    "def.f2": {"ja": "F2転換率：初回購入から90日以内に2回目の購入（別の日）をした新規顧客の割合。",
               "en": "F2 conversion: share of new customers who make a second purchase (another day) within 90 days of the first."},
    "def.active": {"ja": "稼働顧客：直近12か月に1件以上の注文がある顧客。新規顧客：初回購入が直近12か月の顧客。",
                   "en": "Active customer: at least one order in the last 12 months. New customer: first order in the last 12 months."},
    "def.revenue": {"ja": "売上：キャンセル前の受注金額（gross）、キャンセル額、純売上（net＝gross−キャンセル）。",
                    "en": "Revenue: order amounts before cancellation (gross), cancelled amounts, and net = gross - cancelled."},
    "def.cancel": {"ja": "キャンセル率（金額）：キャンセル額÷キャンセル前の受注金額（顧客ごと）。",
                   "en": "Cancellation rate (amount): cancelled amount / gross amount, per customer."},
    "def.segment": {"ja": "セグメント：予測6か月純価値による区分。6か月ごとの世代で決め、世代の間は新規顧客だけを配置します。",
                    "en": "Segment: a band of predicted 6-month net value, set once per six-month generation; between generations only new customers are placed."},
    "def.channel": {"ja": "獲得チャネル：初回注文の媒体。初回購入カテゴリ：初回注文の商品カテゴリ。",
                    "en": "Acquisition channel: channel of the first order. First product category: the category of the first order."},
    # -- weekly -----------------------------------------------------------------------------
    "wk.period": {"ja": "今週 {this}　／　前週 {last}　／　前年同週 {year}",
                  "en": "This week {this} · last week {last} · same week last year {year}"},
    "wk.range": {"ja": "{start}〜{end}", "en": "{start} to {end}"},
    "wk.kpis": {"ja": "今週の数字", "en": "This week in numbers"},
    "wk.points": {"ja": "今週のポイント", "en": "What stands out"},
    "wk.col.metric": {"ja": "指標", "en": "Metric"},
    "wk.col.this": {"ja": "今週", "en": "This week"},
    "wk.col.last": {"ja": "前週", "en": "Last week"},
    "wk.col.wow": {"ja": "前週比", "en": "vs last week"},
    "wk.col.year": {"ja": "前年同週", "en": "Same week last year"},
    "wk.col.yoy": {"ja": "前年比", "en": "vs last year"},
    "wk.orders": {"ja": "注文件数", "en": "Orders"},
    "wk.buyers": {"ja": "購入者数", "en": "Buyers"},
    "wk.new": {"ja": "新規顧客数", "en": "New customers"},
    "wk.f2": {"ja": "F2転換（2回目購入）数", "en": "F2 conversions (second purchases)"},
    "wk.gross": {"ja": "売上（キャンセル前）", "en": "Revenue before cancellations"},
    "wk.net": {"ja": "純売上", "en": "Net revenue"},
    "wk.point.change": {"ja": "{metric}は{value}で、前週比{wow}、前年同週比{yoy}です。",
                        "en": "{metric}: {value}, {wow} vs last week and {yoy} vs the same week last year."},
    "wk.point.channel": {"ja": "新規顧客が最も多いチャネルは「{channel}」（{n}）、前週から最も増えたのは「{up}」（{delta}）です。",
                         "en": "Most new customers came through {channel} ({n}); {up} grew most from last week ({delta})."},
    "wk.channel.title": {"ja": "チャネル別 新規顧客数", "en": "New customers by acquisition channel"},
    "wk.channel.x": {"ja": "獲得チャネル", "en": "Acquisition channel"},
    "wk.channel.aid": {"ja": "今週・前週・前年同週の比較。チャネルごとの獲得の勢いを見ます。",
                       "en": "This week, last week and the same week last year side by side: where acquisition gains or loses pace."},
    "wk.channel.table": {"ja": "チャネル別 新規顧客とF2転換", "en": "New customers and F2 conversions by channel"},
    "wk.col.channel": {"ja": "チャネル", "en": "Channel"},
    "wk.col.new_this": {"ja": "新規 今週", "en": "New, this week"},
    "wk.col.new_last": {"ja": "新規 前週", "en": "New, last week"},
    "wk.col.new_year": {"ja": "新規 前年同週", "en": "New, last year"},
    "wk.col.f2_this": {"ja": "F2 今週", "en": "F2, this week"},
    "wk.col.f2_last": {"ja": "F2 前週", "en": "F2, last week"},
    "wk.col.f2_year": {"ja": "F2 前年同週", "en": "F2, last year"},
    "wk.segments": {"ja": "セグメント別の動き", "en": "Segments this week"},
    "wk.dormant": {"ja": "休眠顧客の動き", "en": "Dormant-customer movements"},
    "wk.col.segment": {"ja": "セグメント", "en": "Segment"},
    "wk.col.customers": {"ja": "顧客数", "en": "Customers"},
    "wk.col.active": {"ja": "購入者数", "en": "Buyers"},
    "wk.col.net_this": {"ja": "純売上 今週", "en": "Net, this week"},
    "wk.col.net_last": {"ja": "純売上 前週", "en": "Net, last week"},
    "wk.col.net_year": {"ja": "純売上 前年同週", "en": "Net, last year"},
    "wk.col.into": {"ja": "休眠へ移動", "en": "Became dormant"},
    "wk.col.out": {"ja": "休眠顧客の購入（復帰）", "en": "Dormant customers who bought (came back)"},
    "wk.dormant.since": {"ja": "セグメントの記録は{date}からです。それより前の週は「—」です。",
                         "en": "Segments are recorded from {date}; earlier weeks show \u2014."},
    "na": {"ja": "—", "en": "—"},
    # -- default segment names (conf segments.bands; other names are shown as configured) ---
    "seg.top": {"ja": "最優良", "en": "top"},
    "seg.high": {"ja": "優良", "en": "high"},
    "seg.middle": {"ja": "中位", "en": "middle"},
    "seg.low": {"ja": "低位", "en": "low"},
    "seg.new": {"ja": "新規", "en": "new"},
    "seg.dormant": {"ja": "休眠", "en": "dormant"},
    "seg.(none)": {"ja": "（前世代なし）", "en": "(none)"},
    "seg.(gone)": {"ja": "（離脱）", "en": "(gone)"},
    "seg.(unsegmented)": {"ja": "（未区分）", "en": "(unsegmented)"},
}


class Messages:
    """Templates of one language: ``m("key", **values)``."""

    def __init__(self, language: str):
        if language not in LANGUAGES:
            raise ValueError(f"report.language: must be one of {', '.join(LANGUAGES)} (got {language!r})")
        self.language = language

    def __call__(self, key: str, **values) -> str:
        try:
            template = CATALOGUE[key][self.language]
        except KeyError:
            raise KeyError(f"report message {key!r} has no {self.language!r} text") from None
        return template.format(**values) if values else template


_SYMBOLS = {"JPY": "¥", "USD": "$", "EUR": "€", "GBP": "£"}


class Formats:
    """Numbers, money, percentages and dates for one language and currency."""

    def __init__(self, language: str, currency: str):
        self.language = language
        self.currency = currency

    @property
    def unit(self) -> str:
        """Money unit for axis labels: 円 in Japanese, the ISO code otherwise."""
        if self.currency == "JPY" and self.language == "ja":
            return "円"
        return self.currency

    def number(self, value: float | int | None, decimals: int = 0) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "—"
        return f"{value:,.{decimals}f}"

    def count(self, value: float | int | None, people: bool = True) -> str:
        text = self.number(value)
        if text == "—":
            return text
        return text + ("人" if people and self.language == "ja" else "")

    def money(self, value: float | None) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "—"
        text = f"{abs(value):,.0f}"
        sign = "-" if value < 0 else ""
        if self.currency == "JPY" and self.language == "ja":
            return f"{sign}{text}円"
        symbol = _SYMBOLS.get(self.currency)
        return f"{sign}{symbol}{text}" if symbol else f"{sign}{text} {self.currency}"

    def money_axis(self, value: float) -> str:
        """Compact tick labels: 1.2万 / 1.2k, 3億 / 300M."""
        if self.language == "ja":
            for size, suffix in ((1e8, "億"), (1e4, "万")):
                if abs(value) >= size:
                    return f"{value / size:,.4g}{suffix}"
            return f"{value:,.0f}"
        for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
            if abs(value) >= size:
                return f"{value / size:,.4g}{suffix}"
        return f"{value:,.0f}"

    def pct(self, share: float | None, decimals: int = 1) -> str:
        if share is None or (isinstance(share, float) and math.isnan(share)):
            return "—"
        return f"{100 * share:.{decimals}f}%"

    def change(self, new: float | None, old: float | None) -> str:
        """Relative change, signed: +12.3% / -4.0%; '—' when the base is 0 or missing."""
        if new is None or old is None or old == 0:
            return "—"
        return f"{100 * (new / old - 1):+.1f}%"

    def ratio(self, value: float) -> str:
        return f"{value:.1f}"

    def date(self, value: dt.date) -> str:
        return value.strftime("%Y年%m月%d日") if self.language == "ja" else value.isoformat()

    def short_date(self, value: dt.date) -> str:
        return value.strftime("%m/%d") if self.language == "ja" else value.strftime("%b %d")

    def month(self, value: dt.date) -> str:
        return value.strftime("%Y-%m")
